"""Routing rules against plain-loop references: token-choice capacity (choice rank first, token order, first C kept,
no renormalisation), expert choice (top-C tokens per expert), sigmoid gating with the DeepSeek-V3 bias (selection
only) and its update rule, and noisy top-k gating (Shazeer et al. 2017) in eval and training mode."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_reference as ref
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.engine.backend import to_device

HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CAPACITY_FACTORS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]  # dyadic: cf·T·k/E is exact, so its ceiling is unambiguous


def skew(moe, x, preference):
    """Feature 0 of x := 2 and router column 0 += preference: a router that crowds some experts."""
    x.data[:, 0] = 2.0
    weight = host(moe.router.weight).copy()
    weight[:, 0] += preference
    set_parameter(moe.router.weight, weight)


# ----- token-choice capacity -----------------------------------------------------------------------------------
def test_capacity_takes_choice_rank_before_token_order_and_does_not_renormalise(device):
    """Tokens 0, 1 choose (e0, e1); tokens 2, 3 choose (e1, e0); C = ceil(1.0 · 4 · 2 / 4) = 2.
    First choices fill e0 with t0, t1 and e1 with t2, t3; every second choice is then dropped. (Token order first
    would instead give t0 and t1 both experts and t2, t3 none.) Each token keeps weight p1/(p1+p2) < 1."""
    moe = layer(d_model=4, n_experts=4, top_k=2, capacity_factor=1.0, device=device)
    weight = np.zeros((4, 4))
    weight[0, 0] = weight[1, 1] = 3.0
    weight[0, 2] = weight[1, 3] = 1.0
    set_parameter(moe.router.weight, weight)
    x = inputs((4, 4), device=device)
    x.data[:] = x.xp.asarray([[1.0, 0, 0.2, 0], [1.0, 0, 0.1, 0], [0, 1.0, 0, 0.3], [0, 1.0, 0, 0.2]])
    params, xs = ref.parameters(moe), host(x)
    expected = ref.token_choice(params, xs, 2, capacity_factor=1.0)
    assert expected["expert_ids"].tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]
    assert expected["kept"].tolist() == [[True, False]] * 4
    with fast_kernels(device):
        y = moe(x)
    first_only = np.stack([expected["weights"][t, 0] * ref.expert_output(params, "swiglu", expected["expert_ids"][t, 0],
                                                                         xs[t]) for t in range(4)])
    np.testing.assert_allclose(host(y), first_only, rtol=1e-10, atol=1e-12)
    assert (expected["weights"][:, 0] < 0.99).all()  # not renormalised to 1 after the drop
    assert moe.stats.dropped_fraction == 0.5
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, [2, 2, 0, 0])
    np.testing.assert_array_equal(moe.stats.requested_per_expert, [4, 4, 0, 0])


def test_a_fully_dropped_token_gets_zero_output_and_zero_expert_gradient(device):
    moe = layer(n_experts=4, top_k=1, capacity_factor=0.5, device=device)  # C = ceil(0.5 · 8 / 4) = 1
    x = inputs((8, 6), device=device)
    skew(moe, x, [4.0, -4.0, -4.0, -4.0])  # every token wants e0, only token 0 gets it
    with fast_kernels(device):
        y = moe(x)
        y.backward(y.xp.ones(y.shape))
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, [1, 0, 0, 0])
    assert moe.stats.dropped_fraction == pytest.approx(7 / 8)
    assert not host(y)[1:].any() and host(y)[0].any()
    assert not host(x.grad)[1:].any() and host(x.grad)[0].any()  # no path from a dropped token to the output


@st.composite
def capacity_cases(draw):
    n_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(3, n_experts)))
    return dict(
        n_tokens=draw(st.integers(1, 12)), n_experts=n_experts, top_k=top_k,
        capacity_factor=draw(st.sampled_from(CAPACITY_FACTORS)), normalize=draw(st.booleans()),
        gate=draw(st.sampled_from(["softmax", "sigmoid"] + (["noisy"] if top_k < n_experts else []))),
        shared=draw(st.integers(0, 1)),
        crowd=draw(st.floats(0.0, 3.0)), seed=draw(st.integers(0, 2**16)),
    )


@given(case=capacity_cases())
@HYPOTHESIS
def test_capacity_dropping_matches_the_plain_loop_reference(device, case):
    moe = layer(d_model=5, d_ff=4, n_experts=case["n_experts"], top_k=case["top_k"], router=case["gate"],
                capacity_factor=case["capacity_factor"], normalize_top_k=case["normalize"],
                n_shared_experts=case["shared"], device=device, seed=case["seed"]).eval()
    bias = None
    if case["gate"] == "sigmoid":
        bias = np.random.default_rng(case["seed"]).normal(0.0, 0.3, case["n_experts"])
        moe.router.bias = to_device(bias, device)
    x = inputs((case["n_tokens"], 5), seed=case["seed"] + 1, device=device)
    skew(moe, x, case["crowd"] * np.linspace(1.0, -1.0, case["n_experts"]))
    expected = ref.token_choice(ref.parameters(moe), host(x), case["top_k"], gate="sigmoid" if bias is not None
                                else "softmax", normalize=case["normalize"], capacity_factor=case["capacity_factor"],
                                bias=bias)
    assert expected["capacity"] == math.ceil(case["capacity_factor"] * case["n_tokens"] * case["top_k"]
                                             / case["n_experts"])
    with fast_kernels(device):
        y = moe(x)
    np.testing.assert_allclose(host(y), expected["y"], rtol=1e-10, atol=1e-12)
    stats = moe.stats
    assert stats.dropped_fraction == pytest.approx(expected["dropped_fraction"], abs=1e-15)
    np.testing.assert_array_equal(stats.tokens_per_expert, expected["tokens_per_expert"])
    np.testing.assert_array_equal(stats.requested_per_expert, expected["requested_per_expert"])
    assert (stats.tokens_per_expert <= expected["capacity"]).all()


def test_capacity_is_per_batch_of_tokens_including_batch_dimensions(device):
    """T counts every token of x (..., d): a (2, 5, d) input has T = 10 and C = ceil(0.5 · 10 · 2 / 4) = ceil(2.5)."""
    moe = layer(n_experts=4, top_k=2, capacity_factor=0.5, device=device)
    x = inputs((2, 5, 6), device=device)
    expected = ref.token_choice(ref.parameters(moe), host(x).reshape(10, 6), 2, capacity_factor=0.5)
    assert expected["capacity"] == 3 and expected["dropped_fraction"] > 0
    with fast_kernels(device):
        y = moe(x)
    np.testing.assert_allclose(host(y).reshape(10, 6), expected["y"], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, expected["tokens_per_expert"])
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, [3, 3, 3, 3])  # C = 3, not 2: a ceiling


def test_capacity_factor_large_enough_drops_nothing(device):
    moe = layer(n_experts=4, top_k=2, capacity_factor=2.0, device=device)  # C = T·k/2 ≥ what any expert is asked
    x = inputs((8, 6), device=device)
    dropless = layer(n_experts=4, top_k=2, device=device)
    with fast_kernels(device):
        np.testing.assert_array_equal(host(moe(x)), host(dropless(x)))
    assert moe.stats.dropped_fraction == 0.0


# ----- expert choice ---------------------------------------------------------------------------------------------
@st.composite
def expert_choice_cases(draw):
    n_experts = draw(st.integers(1, 5))
    return dict(n_tokens=draw(st.integers(1, 12)), n_experts=n_experts,
                capacity_factor=draw(st.sampled_from([f for f in [0.5, 1.0, 1.5, 2.0] if f <= n_experts])),
                activation=draw(st.sampled_from(["swiglu", "gelu"])), shared=draw(st.integers(0, 1)),
                seed=draw(st.integers(0, 2**16)))


@given(case=expert_choice_cases())
@HYPOTHESIS
def test_expert_choice_matches_the_plain_loop_reference(device, case):
    moe = layer(d_model=5, d_ff=4, n_experts=case["n_experts"], top_k=1, router="expert_choice",
                capacity_factor=case["capacity_factor"], activation=case["activation"],
                n_shared_experts=case["shared"], device=device, seed=case["seed"])
    x = inputs((case["n_tokens"], 5), seed=case["seed"] + 1, device=device)
    expected = ref.expert_choice(ref.parameters(moe), host(x), case["capacity_factor"], case["activation"])
    assert expected["capacity"] == math.ceil(case["capacity_factor"] * case["n_tokens"] / case["n_experts"])
    with fast_kernels(device):
        y = moe(x)
    np.testing.assert_allclose(host(y), expected["y"], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, [expected["capacity"]] * case["n_experts"])
    assert moe.stats.dropped_fraction == pytest.approx(expected["dropped_fraction"], abs=1e-15)


def test_expert_choice_gives_a_token_zero_to_E_experts(device):
    """C = ceil(1.0 · 10 / 4) = 3. A confident token may be taken by one expert, a flat one by several, or none."""
    moe = layer(n_experts=4, top_k=1, router="expert_choice", capacity_factor=1.0, device=device)
    x = inputs((10, 6), seed=1, device=device)
    expected = ref.expert_choice(ref.parameters(moe), host(x), 1.0)
    experts_per_token = expected["picked"].sum(axis=1)
    assert experts_per_token.min() == 0 and experts_per_token.max() >= 2  # the case exercises both
    with fast_kernels(device):
        y = moe(x)
    np.testing.assert_allclose(host(y), expected["y"], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(moe.stats.tokens_per_expert, [3, 3, 3, 3])
    untouched = experts_per_token == 0
    assert not host(y)[untouched].any()
    assert moe.stats.dropped_fraction == pytest.approx(untouched.mean())


# ----- sigmoid gating and the DeepSeek-V3 bias -------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sigmoid_weights_come_from_unbiased_scores_over_the_chosen_k(device, top_k, normalize):
    moe = layer(router="sigmoid", top_k=top_k, normalize_top_k=normalize, device=device)
    bias = np.array([0.0, 0.4, -0.3, 0.25])
    moe.router.bias = to_device(bias, device)
    x = inputs((12, 6), device=device)
    params = ref.parameters(moe)
    expected = ref.token_choice(params, host(x), top_k, gate="sigmoid", normalize=normalize, bias=bias)
    unbiased = ref.token_choice(params, host(x), top_k, gate="sigmoid", normalize=normalize)
    assert (expected["expert_ids"] != unbiased["expert_ids"]).any()  # the bias changed some selections
    with fast_kernels(device):
        np.testing.assert_allclose(host(moe(x)), expected["y"], rtol=1e-10, atol=1e-12)


def test_sigmoid_bias_steers_selection_but_its_size_never_enters_the_weights(device):
    """A bias of +5 or +9 on expert 3 gives the same selection (3 plus each token's best other expert), so the
    outputs must be identical: the weights come from σ(z) alone."""
    moe = layer(router="sigmoid", top_k=2, device=device)
    x = inputs((10, 6), device=device)
    outputs = []
    for boost in (5.0, 9.0):
        moe.router.bias = to_device(np.array([0.0, 0.0, 0.0, boost]), device)
        with fast_kernels(device):
            outputs.append(host(moe(x)))
        assert moe.stats.requested_per_expert[3] == 10
    np.testing.assert_array_equal(outputs[0], outputs[1])
    params = ref.parameters(moe)
    s = ref.sigmoid(host(x) @ params["router.weight"].T)
    for t in range(10):
        other = max(range(3), key=lambda e: s[t, e])
        expected = sum(s[t, e] / (s[t, 3] + s[t, other]) * ref.expert_output(params, "swiglu", e, host(x)[t])
                       for e in (3, other))
        np.testing.assert_allclose(outputs[0][t], expected, rtol=1e-10, atol=1e-12)


def test_sigmoid_bias_is_a_buffer_gradients_never_touch(device):
    moe = layer(router="sigmoid", device=device)
    assert "router.bias" not in dict(moe.named_parameters()) and "router.bias" in moe.state_dict()
    moe.router.bias = to_device(np.array([0.1, -0.2, 0.3, 0.0]), device)
    x = inputs((6, 6), device=device)
    with fast_kernels(device):
        y = moe(x)
        ((y * y).sum() + moe.aux_loss + moe.z_loss).backward()
    np.testing.assert_array_equal(host(moe.router.bias), [0.1, -0.2, 0.3, 0.0])


def test_update_bias_applies_the_sign_rule_to_the_last_training_load(device):
    """bias_e += u · sign(mean load − load_e)."""
    moe = layer(router="sigmoid", n_experts=4, top_k=2, device=device)
    x = inputs((16, 6), device=device)
    skew(moe, x, [1.0, 0.5, -0.5, -1.0])
    with fast_kernels(device):
        moe.train()(x)
    load = moe.stats.requested_per_expert.astype(np.float64)
    moe.update_bias(0.125)
    np.testing.assert_array_equal(host(moe.router.bias), 0.125 * np.sign(load.mean() - load))
    assert (np.sign(load.mean() - load) != 0).any()
    with fast_kernels(device):
        moe.eval()(x)  # an eval forward is no training step: the next update still uses the training load
    before = host(moe.router.bias).copy()
    moe.update_bias(0.125)
    np.testing.assert_array_equal(host(moe.router.bias), before + 0.125 * np.sign(load.mean() - load))


def test_bias_update_rate_updates_automatically_after_each_training_forward_only(device):
    moe = layer(router="sigmoid", bias_update_rate=0.0625, device=device)
    x = inputs((16, 6), device=device)
    skew(moe, x, [1.0, 0.5, -0.5, -1.0])
    with fast_kernels(device):
        moe.eval()(x)
        np.testing.assert_array_equal(host(moe.router.bias), np.zeros(4))
        moe.train()(x)
    load = moe.stats.requested_per_expert.astype(np.float64)
    np.testing.assert_array_equal(host(moe.router.bias), 0.0625 * np.sign(load.mean() - load))


@pytest.mark.parametrize("top_k", [1, 2])
def test_repeated_bias_updates_move_a_skewed_router_toward_balance(device, top_k):
    """A sign step of fixed size on a fixed batch settles into a small cycle near balance, not onto it; over the
    last steps the load must still be far flatter than at the start."""
    moe = layer(router="sigmoid", n_experts=4, top_k=top_k, device=device).train()
    x = inputs((64, 6), device=device)
    skew(moe, x, [0.75, 0.25, -0.25, -0.75])  # feature 0 is 2: logits pushed by ±1.5

    def imbalance():
        with fast_kernels(device):
            moe(x)
        load = moe.stats.requested_per_expert
        return load.max() / load.mean()

    history = [imbalance()]
    for _ in range(60):
        moe.update_bias(0.02)
        history.append(imbalance())
    assert history[0] >= 1.6
    settled = np.mean(history[-10:])
    assert settled - 1 <= (history[0] - 1) / 2, history  # the excess over perfect balance at least halves
    spread = host(moe.router.bias)
    assert spread[0] < spread[-1]  # the crowded expert is pushed down, the idle one up


def test_update_bias_errors_are_clear(device):
    with pytest.raises(ValueError, match="sigmoid"):
        layer(router="softmax", device=device).update_bias(0.1)
    moe = layer(router="sigmoid", device=device)
    with pytest.raises(ValueError, match="rate"):
        moe.update_bias()
    with pytest.raises(RuntimeError, match="training"):
        moe.update_bias(0.1)


# ----- noisy top-k gating (Shazeer et al. 2017) --------------------------------------------------------------------
def test_noisy_gating_in_eval_is_softmax_top_k_of_the_clean_logits(device):
    moe = layer(router="noisy", top_k=2, capacity_factor=1.0, device=device).eval()
    x = inputs((10, 6), device=device)
    expected = ref.token_choice(ref.parameters(moe), host(x), 2, capacity_factor=1.0)
    with fast_kernels(device):
        first = host(moe(x))
        set_parameter(moe.router.noise_weight, 50.0 * np.ones((4, 6)))  # a huge noise scale: still no noise
        moe.reseed(99)
        second = host(moe(x))
    np.testing.assert_allclose(first, expected["y"], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(first, second)


def test_noisy_gating_in_training_adds_seeded_noise(device):
    moe = layer(router="noisy", top_k=2, device=device)
    x = inputs((10, 6), device=device)
    with fast_kernels(device):
        evaluated = host(moe.eval()(x))
        moe.train()
        runs = []
        for seed in (1, 1, 2):
            moe.reseed(seed)
            runs.append(host(moe(x)))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], evaluated) and not np.allclose(runs[0], runs[2])


def test_noise_vanishes_where_softplus_of_the_noise_logits_does(device):
    """With x > 0 and Wn = −100, softplus(x·Wn) < e^−300: by the issue's formula H = x·Wg exactly, so a training
    forward must equal the eval one."""
    moe = layer(router="noisy", top_k=2, device=device)
    set_parameter(moe.router.noise_weight, -100.0 * np.ones((4, 6)))
    x = inputs((10, 6), device=device)
    x.data[:] = x.xp.abs(x.data) + 0.5
    with fast_kernels(device):
        evaluated = host(moe.eval()(x))
        moe.train().reseed(0)
        trained = host(moe(x))
    np.testing.assert_allclose(trained, evaluated, rtol=1e-12, atol=1e-13)


def test_noisy_losses_in_eval_match_shazeer_et_al(device):
    """Importance = CV(Σ_t G(x_t))²; Load = CV(Σ_t P(x_t))², P_te = Φ((z_te − kth_excluding(z_t, k, e)) / σ_te).
    σ = softplus(x·Wn), the issue's (and the paper's) noise scale."""
    moe = layer(router="noisy", top_k=2, n_experts=5, device=device).eval()
    x = inputs((12, 6), device=device)
    params, xs = ref.parameters(moe), host(x)
    expected = ref.token_choice(params, xs, 2)
    with fast_kernels(device):
        moe(x)
    z = xs @ params["router.weight"].T
    noise_logits = xs @ params["router.noise_weight"].T
    assert float(host(moe.importance_loss)) == pytest.approx(
        ref.importance_loss(expected["weights"], expected["expert_ids"], 5), rel=1e-8)
    assert float(host(moe.load_loss)) == pytest.approx(
        ref.noisy_load_loss(z, noise_logits, np.zeros_like(z), 2, noise_floor=0.0), rel=1e-8)
    assert float(host(moe.load_loss)) != pytest.approx(  # not tensor2tensor's σ + 0.01
        ref.noisy_load_loss(z, noise_logits, np.zeros_like(z), 2, noise_floor=0.01), rel=1e-6)
