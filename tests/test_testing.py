"""tinymoe.testing: assert_gradients for users' pytest suites, and moe_decisions, the MoE layer's routing
decisions as gradcheck's discrete state (checked on a real near-tie that flips within eps)."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.testing import assert_gradients, moe_decisions
from helpers import leaf

T, D, D_FF, E = 8, 4, 3, 4
GAP = 1e-7                        # token 0's two best logits differ by this; eps = 1e-6 crosses it


class Doubled(tm.Function):
    """y = x² with a backward off by a factor 2 when `wrong`."""

    wrong = False

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (4 if Doubled.wrong else 2) * x * grad


# ----- assert_gradients --------------------------------------------------------------------------------------
def test_assert_gradients_returns_the_report_and_raises_an_assertion_error_with_it(monkeypatch):
    x = leaf([[0.5, -1.5], [2.0, 0.25]])
    report = assert_gradients(Doubled.apply, [x])
    assert report.passed and report.checked == {0: 4}
    monkeypatch.setattr(Doubled, "wrong", True)
    with pytest.raises(AssertionError) as info:
        assert_gradients(Doubled.apply, [x])
    message = str(info.value)
    assert "gradcheck failed" in message and "input 0 of shape (2, 2)" in message and "element (1, 0)" in message
    assert info.value.report.mismatches


def test_assert_gradients_refuses_float32_naming_the_input():
    x64, x32 = leaf([1.0, 2.0]), tm.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError) as info:
        assert_gradients(lambda a, b: a * b, [x64, x32])
    message = str(info.value)
    assert "input 1" in message and "float32" in message and "float64" in message


def test_directions_option():
    big = leaf(np.random.default_rng(0).uniform(0.5, 1.5, (10, 10)))
    assert assert_gradients(Doubled.apply, [big]).perturbations == {0: 4}             # > 64 elements
    assert assert_gradients(Doubled.apply, [big], directions="elements").perturbations == {0: 100}
    assert assert_gradients(Doubled.apply, [leaf([1.0, 2.0])], directions=3).perturbations == {0: 3}
    for bad in (0, -2, "all", True, 1.5):
        with pytest.raises(ValueError, match="directions"):
            assert_gradients(Doubled.apply, [big], directions=bad)


# ----- moe_decisions: a near-tie that really flips -----------------------------------------------------------
def near_tie_layer():
    """A top-1 softmax MoE (capacity 1.0: drops) whose token 0 has logits [1 − GAP, −0.4, 1, −1]: experts 2
    and 0 differ by GAP, every other gap in the batch is > 0.5."""
    moe = tm.nn.MoE(D, D_FF, E, top_k=1, router="softmax", capacity_factor=1.0, dtype="float64", seed=0)
    rng = np.random.default_rng(3)
    for name, parameter in moe.named_parameters():
        parameter.data = rng.standard_normal(parameter.shape) * (1.5 if name == "router.weight" else 0.6)
    weight = moe.router.weight.data
    x = rng.standard_normal((T, D))
    x[0] = np.linalg.solve(weight, [1.0 - GAP, -0.4, 1.0, -1.0])
    return moe, x


def expected_exclusions(weight, x0, eps=1e-6):
    """Oracle: which ±eps nudges swap token 0's experts 2 and 0 (gap g = z2 − z0 = GAP).
    x0[i] moves g by ±eps·(W2i − W0i); W2i moves g by ±eps·x0[i]; W0i by ∓eps·x0[i]."""
    def side(slope):                   # g + step·slope < 0 for the step of this sign
        return None if abs(slope) * eps <= GAP else ("+" if slope < 0 else "-")

    expected = {}
    for i in range(D):
        expected[(0, (0, i))] = side(weight[2, i] - weight[0, i])
        expected[(1, (2, i))] = side(x0[i])
        expected[(1, (0, i))] = side(-x0[i])
    return {key: value for key, value in expected.items() if value is not None}


def test_near_tie_flip_is_excluded_and_reported_and_the_rest_passes():
    moe, values = near_tie_layer()
    weight = moe.router.weight.data.copy()
    logits = values @ weight.T
    top2 = np.sort(logits, axis=1)[:, -2:]
    gaps = top2[:, 1] - top2[:, 0]
    assert gaps[0] == pytest.approx(GAP, rel=1e-6) and gaps[1:].min() > 0.5     # the construction holds
    slopes = np.concatenate([np.abs(weight[2] - weight[0]), np.abs(values[0])])
    assert np.all(np.abs(slopes * 1e-6 - GAP) > 0.3 * GAP)                       # no borderline nudge
    x = leaf(values)
    inputs = [x, moe.router.weight, *moe.experts.parameters()]

    def fn(x, *parameters):
        return moe(x), moe.aux_loss, moe.z_loss

    with tm.kernels.use("numpy"):
        with pytest.raises(tm.GradcheckError):                       # a plain check measures the jump
            tm.gradcheck(fn, inputs)
        report = assert_gradients(fn, inputs, discrete=moe_decisions(moe), directions=None)
        assert moe.stats.dropped_fraction > 0                         # capacity really drops here
    found = {(e.input, e.where): e.sides for e in report.excluded}
    assert found == expected_exclusions(weight, values[0]) and found
    assert report.passed and all(report.checked[p] > 0 for p in report.checked)
    assert "flipped" in report.format()


def test_moe_decisions_matches_a_plain_top_k_with_capacity():
    moe, values = near_tie_layer()
    values[0] += 0.3                                                   # no tie needed here
    with tm.kernels.use("numpy"):
        expert_ids, kept = moe_decisions(moe)(leaf(values))
    logits = values @ moe.router.weight.data.T
    np.testing.assert_array_equal(expert_ids[:, 0], logits.argmax(axis=1))
    capacity = int(np.ceil(1.0 * T * 1 / E))
    taken, expected_kept = {}, np.zeros((T, 1), bool)
    for token in range(T):                                           # top-1: first come, first kept
        expert = int(logits[token].argmax())
        taken[expert] = taken.get(expert, 0) + 1
        expected_kept[token, 0] = taken[expert] <= capacity
    np.testing.assert_array_equal(kept, expected_kept)
    assert not expected_kept.all()


def test_moe_decisions_leaves_a_noisy_layers_forward_unchanged():
    moe = tm.nn.MoE(D, D_FF, E, top_k=2, router="noisy", dtype="float64", seed=1).train()
    x = leaf(np.random.default_rng(4).standard_normal((T, D)))
    with pytest.raises(ValueError, match="reseed"):
        moe_decisions(moe)
    state = moe_decisions(moe, reseed=5)
    with tm.kernels.use("numpy"):
        moe.reseed(9)
        first, second = moe(x).numpy(), moe(x).numpy()
        moe.reseed(9)
        again_first = moe(x).numpy()
        ids_a, _ = state(x)
        again_second = moe(x).numpy()
        ids_b, _ = state(x)
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)               # state() did not consume the noise
    np.testing.assert_array_equal(ids_a, ids_b)                        # reseeded: the same noise each time


def test_moe_decisions_in_a_noisy_training_gradcheck():
    moe = tm.nn.MoE(D, D_FF, E, top_k=2, router="noisy", capacity_factor=0.75, dtype="float64", seed=2).train()
    for parameter in moe.parameters():
        parameter.data = np.random.default_rng(6).standard_normal(parameter.shape)
    x = leaf(np.random.default_rng(7).standard_normal((T, D)))

    def fn(x, *parameters):
        moe.reseed(11)
        return moe(x), moe.aux_loss, moe.z_loss, moe.importance_loss, moe.load_loss

    with tm.kernels.use("numpy"):
        report = assert_gradients(fn, [x, moe.router.weight, moe.router.noise_weight],
                                  discrete=moe_decisions(moe, reseed=11))
    assert report.passed and report.checked[0] > 0


def test_moe_decisions_reads_recorded_decisions_when_the_layer_has_them():
    moe, values = near_tie_layer()
    ids, kept = np.zeros((T, 1), np.int64), np.ones((T, 1), bool)
    moe.last_decisions = (ids, kept)
    got_ids, got_kept = moe_decisions(moe)(leaf(values))
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_kept, kept)


def test_moe_decisions_expert_choice_and_bad_arguments():
    moe = tm.nn.MoE(D, D_FF, E, top_k=2, router="expert_choice", capacity_factor=1.0, dtype="float64", seed=3)
    x = leaf(np.random.default_rng(8).standard_normal((T, D)))
    with tm.kernels.use("numpy"):
        expert_ids, kept = moe_decisions(moe)(x)
    assert expert_ids.shape == kept.shape == (T, E)
    np.testing.assert_array_equal(kept.sum(axis=0), [int(np.ceil(T / E))] * E)   # C tokens per expert
    with pytest.raises(TypeError, match="MoE"):
        moe_decisions(object())
    with pytest.raises(ValueError, match="x=3"):
        moe_decisions(moe, x=3)(x)


def plain_sequence_capacity(expert_ids, n_experts, length, capacity):
    """Kept (T, K): within each sequence, experts take assignments in choice rank, then token order, up to C."""
    kept = np.zeros(expert_ids.shape, bool)
    for start in range(0, expert_ids.shape[0], length):
        taken = {}
        for slot in range(expert_ids.shape[1]):
            for token in range(start, start + length):
                expert = int(expert_ids[token, slot])
                taken[expert] = taken.get(expert, 0) + 1
                kept[token, slot] = taken[expert] <= capacity
    return kept


def test_moe_decisions_counts_capacity_per_sequence():
    from tinymoe.nn.moe import sequence_capacity_mask

    moe = tm.nn.MoE(D, D_FF, E, top_k=2, capacity_factor=0.75, capacity_per="sequence", dtype="float64", seed=4)
    x = leaf(np.random.default_rng(9).standard_normal((3, 8, D)) + np.linspace(0, 2, D))  # skewed: drops
    with tm.kernels.use("numpy"):
        expert_ids, kept = moe_decisions(moe)(x)
    capacity = int(np.ceil(0.75 * 8 * 2 / E))
    expected = plain_sequence_capacity(expert_ids, E, 8, capacity)
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(kept, sequence_capacity_mask(expert_ids, E, 8, capacity))
    batch_capacity = int(np.ceil(0.75 * 24 * 2 / E))
    assert not (kept == plain_sequence_capacity(expert_ids, E, 24, batch_capacity)).all()  # the batch rule differs
    assert not kept.all()


@pytest.mark.parametrize("defer", [False, True])
def test_moe_decisions_leaves_the_relu_routers_state_alone(defer):
    moe = tm.nn.MoE(D, D_FF, E, top_k=2, router="relu", dtype="float64", seed=5).train()
    router = moe.router
    router.defer_updates = defer
    x = leaf(np.random.default_rng(10).standard_normal((T, D)))
    with tm.kernels.use("numpy"):
        moe(x)
        before = (float(router.l1_coefficient), router.last_sparsity, router.pending_gates, router.pending_load)
        moe_decisions(moe)(x)
        after = (float(router.l1_coefficient), router.last_sparsity, router.pending_gates, router.pending_load)
        assert after == before
        assert "l1_coefficient" in router._buffers
        moe(x)  # a real training forward does step λ (or add to the pending sums): the check above can fail
    assert (router.pending_gates != before[2]) if defer else (float(router.l1_coefficient) != before[0])
