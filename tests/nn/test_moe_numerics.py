"""Numerics of the MoE layer: jitter (router input only, training only, multiplicative), the router dtype
(float32 at least, float64 for float64 layers, float16 layers on CUDA), and stability at logits of ±1e4."""
import re

import numpy as np
import pytest

import tinymoe as tm
import moe_reference as ref
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter

ROUTERS = ["softmax", "noisy", "sigmoid", "expert_choice"]


# ----- jitter -----------------------------------------------------------------------------------------------
def test_jitter_never_acts_in_eval_mode(device):
    jittered, plain = layer(jitter=0.5, device=device), layer(jitter=0.0, device=device)
    x = inputs((10, 6), device=device)
    with fast_kernels(device):
        np.testing.assert_array_equal(host(jittered.eval()(x)), host(plain.eval()(x)))
        np.testing.assert_array_equal(host(plain.train()(x)), host(plain.eval()(x)))  # no other training noise
        assert not np.allclose(host(jittered.train()(x)), host(plain.eval()(x)))    # but jitter acts in training


def test_jitter_perturbs_the_router_input_only_never_the_experts_input(device):
    """Router weight 0 makes the logits 0 whatever the router input, so with k = E every expert gets weight 1/E:
    the output is then a function of what the experts (and the shared expert) see. It must be the clean x."""
    moe = layer(top_k=4, n_experts=4, jitter=0.5, n_shared_experts=1, activation="swiglu", device=device).train()
    set_parameter(moe.router.weight, np.zeros((4, 6)))
    x = inputs((10, 6), device=device)
    params, xs = ref.parameters(moe), host(x).copy()

    def uniform_mixture(features):
        routed = ref.all_expert_outputs(params, "swiglu", features).mean(axis=0)
        return routed + np.stack([ref.shared_output(params, row) for row in features])

    with fast_kernels(device):
        moe.reseed(0)
        y = host(moe(x))
    np.testing.assert_allclose(y, uniform_mixture(xs), rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(host(x), xs)  # and the caller's x is left as it was
    # The test can tell: had the experts seen jittered features, the output would be this far off.
    jittered = xs * np.random.default_rng(0).uniform(0.5, 1.5, xs.shape)
    assert np.abs(uniform_mixture(jittered) - y).max() > 1e-3


def test_jitter_is_multiplicative_so_a_zero_token_routes_as_in_eval(device):
    """x · U(1−j, 1+j): a token of zeros has zero router input in training too; additive noise would move it."""
    moe = layer(jitter=0.5, activation="gelu", device=device)
    x = inputs((10, 6), device=device)
    x.data[0] = 0.0
    with fast_kernels(device):
        evaluated = host(moe.eval()(x))
        moe.train().reseed(3)
        trained = host(moe(x))
    np.testing.assert_array_equal(trained[0], evaluated[0])
    assert not np.allclose(trained[1:], evaluated[1:])


# ----- router dtype ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ROUTERS)
def test_a_float64_layer_routes_in_float64(device, router):
    options = dict(capacity_factor=1.0) if router == "expert_choice" else {}
    moe = layer(router=router, device=device, **options)
    for name, parameter in moe.named_parameters():
        assert parameter.dtype == np.float64, name
    x = inputs((8, 6), device=device)
    with fast_kernels(device):
        y = moe(x)
    assert y.dtype == np.float64 and moe.aux_loss.dtype == np.float64 and moe.z_loss.dtype == np.float64


@pytest.mark.parametrize("router", ROUTERS)
def test_a_float32_layer_routes_in_float32_and_matches_the_float64_reference(device, router):
    options = dict(capacity_factor=1.0) if router == "expert_choice" else {}
    moe = layer(router=router, dtype="float32", device=device, **options).eval()
    router_names = [name for name, _ in moe.named_parameters() if name.startswith("router.")]
    assert all(getattr(moe.router, name.split(".")[1]).dtype == np.float32 for name in router_names)
    if router == "sigmoid":
        assert moe.router.bias.dtype == np.float32
    x = inputs((8, 6), dtype="float32", device=device)
    with fast_kernels(device):
        y = moe(x)
    assert y.dtype == np.float32 and moe.aux_loss.dtype == np.float32 and moe.z_loss.dtype == np.float32
    params, xs = ref.parameters(moe), host(x).astype(np.float64)
    if router in ("softmax", "noisy"):
        expected = ref.token_choice(params, xs, 2)["y"]
    elif router == "sigmoid":
        expected = ref.token_choice(params, xs, 2, gate="sigmoid", bias=params["router.bias"])["y"]
    else:
        expected = ref.expert_choice(params, xs, 1.0)["y"]
    np.testing.assert_allclose(host(y), expected, rtol=2e-5, atol=2e-6)


CUDA_ONLY = pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not tm.cuda_available(), reason="float16 layers are CUDA-only; needs CuPy and a CUDA device")])


@pytest.mark.parametrize("gpu", [CUDA_ONLY])
@pytest.mark.parametrize("router", ROUTERS)
def test_a_float16_layer_routes_in_float32(gpu, router):
    options = dict(capacity_factor=1.0) if router == "expert_choice" else {}
    moe = layer(router=router, dtype="float16", device=gpu, **options).eval()
    assert moe.router.weight.dtype == np.float32 and moe.experts.w1.dtype == np.float16
    x = inputs((8, 6), dtype="float16", device=gpu)
    y = moe(x)
    assert y.dtype == np.float16 and moe.aux_loss.dtype == np.float32 and moe.z_loss.dtype == np.float32
    params, xs = ref.parameters(moe), host(x).astype(np.float64)
    if router in ("softmax", "noisy"):
        expected = ref.token_choice(params, xs, 2)["y"]
    elif router == "sigmoid":
        expected = ref.token_choice(params, xs, 2, gate="sigmoid", bias=params["router.bias"])["y"]
    else:
        expected = ref.expert_choice(params, xs, 1.0)["y"]
    np.testing.assert_allclose(host(y).astype(np.float64), expected, rtol=2e-2, atol=2e-2)


# ----- stability ----------------------------------------------------------------------------------------------
# σ(z) underflows to 0 below z ≈ −745: the sigmoid gate must normalise in log space to stay finite there.
EXTREME_LOGITS = [pytest.param(router, sign, id=f"{router}-{sign}")
                  for router in ROUTERS for sign in ("mixed", "all-negative")]


@pytest.mark.parametrize("router, sign", EXTREME_LOGITS)
def test_router_logits_of_1e4_give_finite_outputs_and_gradients(device, router, sign):
    options = dict(capacity_factor=1.0) if router == "expert_choice" else dict(capacity_factor=1.25)
    moe = layer(router=router, n_shared_experts=1, device=device, **options).train(router == "noisy")
    x = inputs((8, 6), device=device)
    xs = host(x)
    if sign == "all-negative":
        x.data[:] = x.xp.abs(x.data) + 0.5
        xs = host(x)
        weight = -np.outer(1 + 0.1 * np.arange(4), np.ones(6))
    else:
        weight = host(moe.router.weight)
    weight = weight * (1e4 / np.abs(xs @ weight.T).max())
    set_parameter(moe.router.weight, weight)
    if router == "noisy":
        set_parameter(moe.router.noise_weight, weight[::-1].copy())
    logits = xs @ weight.T
    assert np.abs(logits).max() == pytest.approx(1e4) and (sign == "mixed" or logits.max() < -1e3)
    with fast_kernels(device):
        moe.reseed(0)
        y = moe(x)
        total = (y * y).sum() + moe.aux_loss + moe.z_loss
        if router == "noisy":
            total = total + moe.importance_loss + moe.load_loss
        total.backward()
    assert np.isfinite(host(y)).all() and np.isfinite(host(total)).all()
    assert float(host(moe.z_loss)) > 1e6  # the logits really were ~1e4
    assert np.isfinite(host(x.grad)).all()
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None and np.isfinite(host(parameter.grad)).all(), name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("router", ROUTERS)
def test_a_non_finite_input_raises_floating_point_error_naming_the_layer(device, router, bad):
    options = dict(capacity_factor=1.0) if router == "expert_choice" else {}
    moe = layer(router=router, device=device, name="layers.3.moe", **options)
    x = inputs((5, 6), device=device)
    x.data[2, 4] = bad
    with pytest.raises(FloatingPointError, match=re.escape("layers.3.moe")):
        moe(x)


def test_non_finite_router_weights_raise_floating_point_error_naming_the_layer(device):
    moe = layer(device=device, name="block7")
    weight = host(moe.router.weight).copy()
    weight[1, 2] = np.nan
    set_parameter(moe.router.weight, weight)
    with pytest.raises(FloatingPointError, match="block7"):
        moe(inputs((5, 6), device=device))
