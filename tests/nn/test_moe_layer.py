"""The MoE layer against plain NumPy references: dense k = E, Mixtral and Switch weights, shared experts, the
torch parameter layout, and dispatch edge cases (empty experts, T = 1, all tokens on one expert)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_reference as ref
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
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
