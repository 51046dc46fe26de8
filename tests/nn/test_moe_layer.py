"""The MoE layer against plain NumPy references: dense k = E, Mixtral and Switch weights, shared experts, dispatch
edge cases (empty experts, T = 1, all tokens on one expert), determinism, kernel implementations, jitter, router
dtype, stability at logits of ±1e4, and clear errors for bad arguments and inputs."""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymoe as tm
import moe_reference as ref
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.engine.tensor import Tensor
from tinymoe.nn import MoE

HYPOTHESIS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROUTERS = ["softmax", "noisy", "sigmoid", "expert_choice"]
ACTIVATIONS = ["swiglu", "gelu", "relu", "silu"]


def assert_matches(actual, expected, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(host(actual), expected, rtol=rtol, atol=atol)


# ----- semantics against the references -------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_k_equal_to_E_is_the_dense_softmax_mixture(device, activation, normalize):
    """Jacobs et al. 1991: y_t = Σ_e softmax(z_t)_e · expert_e(x_t), every expert, computed directly."""
    moe = layer(top_k=4, n_experts=4, activation=activation, normalize_top_k=normalize, device=device)
    x = inputs((9, 6), device=device)
    params, xs = ref.parameters(moe), host(x)
    gate = ref.softmax(xs @ params["router.weight"].T)
    dense = np.einsum("te,etd->td", gate, ref.all_expert_outputs(params, activation, xs))
    with fast_kernels(device):
        assert_matches(moe(x), dense)
    assert list(moe.stats.tokens_per_expert) == [9, 9, 9, 9]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_mixtral_weights_renormalised_over_the_chosen(device, activation, top_k):
    moe = layer(top_k=top_k, activation=activation, device=device)
    x = inputs((10, 6), device=device)
    expected = ref.token_choice(ref.parameters(moe), host(x), top_k, activation)
    with fast_kernels(device):
        assert_matches(moe(x), expected["y"])


@pytest.mark.parametrize("top_k", [1, 2])
def test_normalize_top_k_false_uses_the_raw_softmax_probabilities(device, top_k):
    """Switch: the combine weight is p_e itself, not renormalised over the chosen experts."""
    moe = layer(top_k=top_k, normalize_top_k=False, device=device)
    x = inputs((10, 6), device=device)
    params, xs = ref.parameters(moe), host(x)
    with fast_kernels(device):
        y = host(moe(x))
    np.testing.assert_allclose(y, ref.token_choice(params, xs, top_k, normalize=False)["y"], rtol=1e-10, atol=1e-12)
    if top_k == 1:  # y_t = max_e p_te · expert_argmax(x_t), and p_max < 1, so it differs from the normalised layer
        p = ref.softmax(xs @ params["router.weight"].T)
        switch = np.stack([p[t].max() * ref.expert_output(params, "swiglu", int(p[t].argmax()), xs[t])
                           for t in range(len(xs))])
        np.testing.assert_allclose(y, switch, rtol=1e-10, atol=1e-12)
        assert not np.allclose(y, ref.token_choice(params, xs, 1, normalize=True)["y"])


@pytest.mark.parametrize("n_shared", [1, 2])
def test_shared_experts_are_always_on_swiglu_added_to_every_token(device, n_shared):
    moe = layer(n_shared_experts=n_shared, activation="relu", device=device)
    assert tuple(moe.shared.w1.shape) == (n_shared * 5, 6)  # n experts of width d_ff, side by side
    x = inputs((7, 6), device=device)
    params, xs = ref.parameters(moe), host(x)
    expected = ref.token_choice(params, xs, 2, "relu")["y"]
    shared_only = np.stack([ref.shared_output(params, x_t) for x_t in xs])
    assert np.abs(shared_only).min(axis=1).max() > 0
    with fast_kernels(device):
        assert_matches(moe(x), expected)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_parameter_names_and_shapes_follow_the_torch_layout(router, activation):
    """router.weight (E, d); experts.w1 (E, ff, d), w3 (E, ff, d) for SwiGLU, w2 (E, d, ff); b1 (E, ff), b2 (E, d)
    for the non-GLU activations; router.noise_weight (E, d) for "noisy"; router.bias (E,) buffer for "sigmoid"."""
    options = dict(capacity_factor=1.0) if router == "expert_choice" else {}
    moe = MoE(6, 5, 4, top_k=2, router=router, activation=activation, n_shared_experts=1, dtype="float64", seed=0,
              **options)
    shapes = {name: tuple(parameter.shape) for name, parameter in moe.named_parameters()}
    expected = {"router.weight": (4, 6), "experts.w1": (4, 5, 6), "experts.w2": (4, 6, 5),
                "shared.w1": (5, 6), "shared.w3": (5, 6), "shared.w2": (6, 5)}
    if activation == "swiglu":
        expected["experts.w3"] = (4, 5, 6)
    else:
        expected.update({"experts.b1": (4, 5), "experts.b2": (4, 6)})
    if router == "noisy":
        expected["router.noise_weight"] = (4, 6)
    assert shapes == expected
    buffers = {name: tuple(np.shape(buffer)) for name, buffer in moe.named_buffers()}
    assert buffers == ({"router.bias": (4,)} if router == "sigmoid" else {})


@st.composite
def dropless_cases(draw):
    n_experts = draw(st.integers(1, 6))
    return dict(
        n_tokens=draw(st.integers(1, 12)), n_experts=n_experts, top_k=draw(st.integers(1, n_experts)),
        activation=draw(st.sampled_from(ACTIVATIONS)), normalize=draw(st.booleans()),
        batch=draw(st.sampled_from([(), (1,), (2,)])), seed=draw(st.integers(0, 2**16)),
    )


@given(case=dropless_cases())
@HYPOTHESIS
def test_dropless_token_choice_matches_the_reference_for_any_shape(device, case):
    """Any T (including 1), E (including 1), k (including E), activation and batch shape; statistics included."""
    moe = layer(d_model=4, d_ff=3, n_experts=case["n_experts"], top_k=case["top_k"], activation=case["activation"],
                normalize_top_k=case["normalize"], device=device, seed=case["seed"])
    n_tokens = case["n_tokens"] * (case["batch"][0] if case["batch"] else 1)
    shape = (*case["batch"], case["n_tokens"], 4)
    x = inputs(shape, seed=case["seed"] + 1, device=device)
    expected = ref.token_choice(ref.parameters(moe), host(x).reshape(n_tokens, 4), case["top_k"], case["activation"],
                                normalize=case["normalize"])
    with fast_kernels(device):
        y = moe(x)
    assert y.shape == shape
    np.testing.assert_allclose(host(y).reshape(n_tokens, 4), expected["y"], rtol=1e-10, atol=1e-12)
    stats = moe.stats
    np.testing.assert_array_equal(stats.requested_per_expert, expected["requested_per_expert"])
    np.testing.assert_array_equal(stats.tokens_per_expert, expected["requested_per_expert"])
    assert stats.tokens_per_expert.sum() == n_tokens * case["top_k"]
    assert stats.dropped_fraction == 0.0
    entropy, top1 = ref.entropy_and_top1(expected["probs"])
    assert stats.router_entropy == pytest.approx(entropy, rel=1e-9, abs=1e-12)
    assert stats.mean_top1_probability == pytest.approx(top1, rel=1e-9)


# ----- dispatch edge cases -----------------------------------------------------------------------------------
def steer(moe, x, preference):
    """Make feature 0 of x a constant 3 and router column 0 = preference, so the router's choice follows it."""
    x.data[:, 0] = 3.0
    weight = host(moe.router.weight).copy()
    weight[:, 0] = preference
    weight[:, 1:] *= 0.2
    set_parameter(moe.router.weight, weight)


def check_against_reference_with_gradients(moe, x, top_k):
    params, xs = ref.parameters(moe), host(x)
    y = moe(x)
    assert_matches(y, ref.token_choice(params, xs, top_k)["y"])
    y.backward(y.xp.asarray(np.random.default_rng(3).standard_normal(y.shape)))
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None and np.isfinite(host(parameter.grad)).all(), name
    return y


def test_empty_experts_work_and_get_zero_gradient(device):
    moe = layer(n_experts=5, top_k=2, device=device)
    x = inputs((8, 6), device=device)
    steer(moe, x, [2.0, 1.5, -5.0, -5.0, -5.0])
    with fast_kernels(device):
        check_against_reference_with_gradients(moe, x, 2)
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, [8, 8, 0, 0, 0])
    for name in ("w1", "w2", "w3"):
        assert not host(getattr(moe.experts, name).grad)[2:].any()
        assert host(getattr(moe.experts, name).grad)[:2].any()


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert(device, top_k):
    moe = layer(n_experts=4, top_k=top_k, device=device)
    x = inputs((9, 6), device=device)
    steer(moe, x, [-5.0, 4.0, -5.0, 1.0])
    with fast_kernels(device):
        check_against_reference_with_gradients(moe, x, top_k)
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, [0, 9, 0, 9] if top_k == 2 else [0, 9, 0, 0])


@pytest.mark.parametrize("router", ROUTERS)
def test_a_single_token_and_a_1d_input(device, router):
    options = dict(capacity_factor=1.0) if router == "expert_choice" else {}
    moe = layer(router=router, device=device, **options).eval()
    x = inputs((6,), device=device)
    with fast_kernels(device):
        y = moe(x)
        y_row = moe(x.reshape(1, 6))
    assert y.shape == (6,) and y_row.shape == (1, 6)
    np.testing.assert_array_equal(host(y), host(y_row)[0])
    if router in ("softmax", "noisy"):  # noisy in eval is softmax top-k of the clean logits
        assert_matches(y, ref.token_choice(ref.parameters(moe), host(x)[None], 2)["y"][0])
    if router == "sigmoid":
        params = ref.parameters(moe)
        expected = ref.token_choice(params, host(x)[None], 2, gate="sigmoid", bias=params["router.bias"])
        assert_matches(y, expected["y"][0])
    if router == "expert_choice":  # C = ceil(1 · 1 / 4) = 1: every expert takes the only token
        assert_matches(y, ref.expert_choice(ref.parameters(moe), host(x)[None], 1.0)["y"][0])


# ----- determinism and kernels ---------------------------------------------------------------------------------
DETERMINISM = [
    dict(router="softmax", capacity_factor=0.75, n_shared_experts=1),
    dict(router="noisy", jitter=0.3),
    dict(router="sigmoid", activation="gelu"),
    dict(router="expert_choice", capacity_factor=1.5),
]


@pytest.mark.parametrize("options", DETERMINISM, ids=[o["router"] for o in DETERMINISM])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_same_seed_gives_bit_identical_layers_outputs_and_gradients(device, options, training):
    def run(seed):
        moe = MoE(6, 5, 4, top_k=2, dtype="float64", device=device, seed=seed, **options).train(training)
        x = inputs((12, 6), device=device)
        with fast_kernels(device):
            y = moe(x)
            y.backward(y.xp.asarray(np.random.default_rng(0).standard_normal(y.shape)))
        return moe, host(y), host(x.grad), [host(p.grad) for p in moe.parameters()]

    first, second, other = run(11), run(11), run(12)
    for (name, a), (_, b) in zip(first[0].named_parameters(), second[0].named_parameters()):
        np.testing.assert_array_equal(host(a), host(b), err_msg=name)
    for a, b in zip(first[1:3], second[1:3]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first[3], second[3]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])  # and the seed matters


def test_repeated_forwards_are_bit_identical_and_reseed_repeats_noise(device):
    moe = layer(router="noisy", jitter=0.2, capacity_factor=1.0, device=device)
    x = inputs((12, 6), device=device)
    with fast_kernels(device):
        eval_outputs = [host(moe.eval()(x)) for _ in range(2)]
        moe.train()
        moe.reseed(5)
        first = host(moe(x))
        moe.reseed(5)
        again = host(moe(x))
        moe.reseed(6)
        other = host(moe(x))
    np.testing.assert_array_equal(eval_outputs[0], eval_outputs[1])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


KERNEL_CASES = [
    dict(router="softmax", capacity_factor=0.75, n_shared_experts=1, n_tokens=12),
    dict(router="softmax", top_k=3, n_tokens=257),
    dict(router="sigmoid", activation="gelu", capacity_factor=1.25, n_tokens=40),
    dict(router="expert_choice", capacity_factor=1.0, n_tokens=33),
    dict(router="noisy", top_k=1, n_tokens=20),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: f"{case['router']}-T{case['n_tokens']}")
def test_every_kernel_implementation_matches_the_numpy_reference(device, case):
    options = dict(case)
    n_tokens = options.pop("n_tokens")
    moe = layer(device=device, **{"top_k": 2, **options})
    cotangent = np.random.default_rng(4).standard_normal((n_tokens, 6))
    results = {}
    names = ["auto", *tm.kernels.available(device)]
    for name in names:
        x = inputs((n_tokens, 6), device=device)
        moe.zero_grad()
        with tm.kernels.use(name):
            moe.reseed(0)  # the layer trains by default: the same noise for every implementation
            y = moe(x)
            y.backward(y.xp.asarray(cotangent))
        results[name] = (host(y), host(x.grad), [host(p.grad) for p in moe.parameters()], moe.stats.as_dict())
    expected = results["numpy"]
    for name in names:
        np.testing.assert_allclose(results[name][0], expected[0], rtol=1e-12, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(results[name][1], expected[1], rtol=1e-12, atol=1e-13, err_msg=name)
        for got, want in zip(results[name][2], expected[2]):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12, err_msg=name)
        stats, expected_stats = results[name][3], expected[3]
        for key in ("tokens_per_expert", "requested_per_expert"):
            assert stats[key] == expected_stats[key], (name, key)
        for key in ("dropped_fraction", "router_entropy", "mean_top1_probability"):
            assert stats[key] == pytest.approx(expected_stats[key], rel=1e-12), (name, key)
    assert device != "cpu" or not tm.numba_available() or "numba" in names


@st.composite
def routing_cases(draw):
    router = draw(st.sampled_from(ROUTERS))
    n_experts = draw(st.integers(2 if router == "noisy" else 1, 6))
    top_k = draw(st.integers(1, n_experts - 1 if router == "noisy" else n_experts))
    return dict(router=router, n_experts=n_experts, top_k=top_k, n_tokens=draw(st.integers(1, 40)),
                capacity_factor=draw(st.sampled_from([None, 0.5, 1.0, 1.5])) if router != "expert_choice"
                else draw(st.sampled_from([0.5, 1.0])),
                dtype=draw(st.sampled_from(["float64", "float32"])), seed=draw(st.integers(0, 2**16)))


@given(case=routing_cases())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_implementations_agree_for_any_routing(device, case):
    moe = layer(d_model=4, d_ff=3, n_experts=case["n_experts"], top_k=case["top_k"], router=case["router"],
                capacity_factor=case["capacity_factor"], dtype=case["dtype"], device=device, seed=case["seed"]).eval()
    tolerance = dict(rtol=1e-12, atol=1e-13) if case["dtype"] == "float64" else dict(rtol=1e-5, atol=1e-6)
    results = []
    for name in tm.kernels.available(device):
        x = inputs((case["n_tokens"], 4), seed=case["seed"], dtype=case["dtype"], device=device)
        moe.zero_grad()
        with tm.kernels.use(name):
            y = moe(x)
            y.backward(y.xp.ones(y.shape, dtype=y.dtype))
        results.append((host(y), host(x.grad), *[host(p.grad) for p in moe.parameters()], moe.stats.tokens_per_expert))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_allclose(got, want, **tolerance)


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


# ----- bad arguments and inputs -----------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=5), ValueError, "top_k"),
    (dict(top_k=1.5), (ValueError, TypeError), "top_k"),
    (dict(capacity_factor=0), ValueError, "capacity_factor"),
    (dict(capacity_factor=-0.5), ValueError, "capacity_factor"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
    (dict(capacity_factor="1.0"), (ValueError, TypeError), "capacity_factor"),
    (dict(router="top2"), ValueError, "router"),
    (dict(router="Softmax"), ValueError, "router"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation="geglu"), ValueError, "activation"),
    (dict(n_shared_experts=-1), ValueError, "n_shared_experts"),
    (dict(jitter=-0.1), ValueError, "jitter"),
    (dict(jitter=1.0), ValueError, "jitter"),
    (dict(bias_update_rate=0.01, router="softmax"), ValueError, "bias_update_rate"),
    (dict(bias_update_rate=-0.01, router="sigmoid"), ValueError, "bias_update_rate"),
    (dict(dtype="int32"), TypeError, "dtype"),
    (dict(dtype="float16"), TypeError, "float16"),  # CUDA-only
]


@pytest.mark.parametrize("options, error, argument", BAD_ARGUMENTS,
                         ids=[f"{next(iter(o))}={list(o.values())[0]!r}" for o, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_raise_errors_naming_the_argument(options, error, argument):
    with pytest.raises(error, match=argument):
        MoE(6, 5, 4, **{"top_k": 2, **options})


def test_an_infinite_capacity_factor_is_refused_or_dropless():
    try:
        moe = layer(capacity_factor=float("inf"))
    except ValueError as error:
        assert "capacity_factor" in str(error)
        return
    moe(inputs((6, 6)))
    assert moe.stats.dropped_fraction == 0.0


@pytest.mark.parametrize("argument", ["capacity_factor", "jitter"])
def test_numpy_scalar_arguments_are_accepted(argument):
    moe = layer(**{argument: np.float32(0.5)})
    assert moe(inputs((6, 6))).shape == (6, 6)


def test_wrong_last_dimension_names_d_model(device):
    moe = layer(device=device)
    for shape in [(5, 7), (5, 5), (6, 1)]:
        with pytest.raises(ValueError, match="d_model=6"):
            moe(inputs(shape, device=device))


def test_integer_input_is_rejected(device):
    moe = layer(device=device)
    with pytest.raises(TypeError, match="x"):
        moe(np.ones((5, 6), dtype=np.int64))
    integer_tensor = Tensor(np.ones((5, 6), dtype=np.int64))  # a Tensor holding integers slipped past tm.tensor
    with pytest.raises(TypeError, match="int64"):
        moe(integer_tensor)


@pytest.mark.parametrize("layer_dtype, input_dtype", [("float64", "float32"), ("float32", "float64")])
def test_dtype_mismatch_between_input_and_layer_names_both(layer_dtype, input_dtype):
    moe = layer(dtype=layer_dtype)
    with pytest.raises(TypeError, match=f"(?s)(?=.*{layer_dtype})(?=.*{input_dtype})"):
        moe(inputs((5, 6), dtype=input_dtype))
