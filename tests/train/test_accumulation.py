"""Gradient accumulation (tinymoe.train.accumulation): N micro-batches give the gradients of one N-times-larger
batch in float64 (to 1e-12), the global balance loss of the big batch, and one aux-free bias / L1-coefficient
update per step from the load summed over the step."""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.nn import Module, MoE
from tinymoe.train.accumulation import (accumulate_gradients, mean_over_micro_batches, merge_layer_counts,
                                        merge_loss_parts, routers_of, split_micro_batches)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from moe_helpers import randomize  # noqa: E402

D_MODEL, N_EXPERTS = 6, 4


class TwoLayers(Module):
    """Two MoE layers in a row: the second layer's routing depends on the first's output."""

    def __init__(self, **options):
        super().__init__()
        self.first = randomize(MoE(D_MODEL, 5, N_EXPERTS, dtype="float64", seed=0, **options), 0)
        self.second = randomize(MoE(D_MODEL, 5, N_EXPERTS, dtype="float64", seed=1, **options), 1)

    def forward(self, x):
        h = x + self.first(x)
        return h + self.second(h)


def step_loss(model, batch):
    """Mean over tokens of y², plus every router loss (each a mean over tokens, or a global-batch loss)."""
    (x,) = batch
    y = model(tm.tensor(x, dtype="float64"))
    loss = (y * y).mean()
    for moe in (model.first, model.second):
        loss = loss + 0.1 * moe.z_loss
        if moe.router.balance != "batch":  # the batch loss is micro-batch local by definition
            loss = loss + 0.5 * moe.aux_loss
        for extra in (moe.entropy_loss, moe.l1_loss):
            if extra is not None:
                loss = loss + 0.3 * extra
    return loss, float(sum(float(m.aux_loss.numpy()) for m in (model.first, model.second)))


def gradients(model):
    return {name: parameter.grad.copy() for name, parameter in model.named_parameters()}


CASES = [
    dict(router="softmax"),
    dict(router="softmax", balance="global"),
    dict(router="softmax", balance="sequence", capacity_factor=None),
    dict(router="top_p", top_p=0.6, top_k=3, balance="global"),
    dict(router="softmax", n_null_experts=2, top_k=3, balance="global"),
    dict(router="sigmoid", bias_update_rate=0.01, balance="global"),
    dict(router="relu", target_sparsity=0.3, l1_coefficient=0.01),
    dict(router="relu", balance="global"),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_accumulation_equals_one_big_batch(options):
    with tm.kernels.use("numpy"):
        big = TwoLayers(**options)
        accumulated = copy.deepcopy(big)
        x = np.random.default_rng(3).standard_normal((6, 4, D_MODEL))
        big_loss, big_aux = step_loss(big, (x,))
        big_loss.backward()
        results = accumulate_gradients(accumulated, lambda batch: step_loss(accumulated, batch), split_micro_batches((x,), 3))
    expected = gradients(big)
    for name, grad in gradients(accumulated).items():
        scale = max(1.0, float(np.abs(expected[name]).max()))  # relu gates are unbounded: large gradients
        np.testing.assert_allclose(grad, expected[name], rtol=0, atol=1e-12 * scale, err_msg=name)
    mean_loss = np.mean([float(result[0].numpy()) for result in results])
    assert mean_loss == pytest.approx(float(big_loss.numpy()), rel=1e-12, abs=1e-12)
    if options.get("balance") == "global":  # the global loss of the micro-batches is the big batch's
        assert np.mean([result[1] for result in results]) == pytest.approx(big_aux, abs=1e-12)
    for router_big, router_acc in zip(routers_of(big), routers_of(accumulated)):
        for name, buffer in router_big.named_buffers():  # one bias / λ update per step, from the summed load
            np.testing.assert_allclose(dict(router_acc.named_buffers())[name], buffer, rtol=1e-14, err_msg=name)
        assert router_acc.defer_updates is False and router_acc.global_load is None


def test_bias_moves_once_per_step_from_the_summed_load():
    """Sigmoid router, rate u: after the step bias = u · sign(mean load − load), load summed over the micro-batches."""
    model = TwoLayers(router="sigmoid", bias_update_rate=0.25)
    before = model.first.router.bias.copy()
    micro = split_micro_batches((np.random.default_rng(5).standard_normal((4, 3, D_MODEL)),), 2)
    loads = []

    def loss_fn(batch):
        loss = step_loss(model, batch)[0]
        loads.append(model.first.router.last_load.copy())
        return loss

    accumulate_gradients(model, loss_fn, micro)
    load = loads[0] + loads[1]
    np.testing.assert_allclose(model.first.router.bias - before, 0.25 * np.sign(load.mean() - load), atol=1e-15)


def test_without_the_helper_the_layer_updates_every_forward():
    model = TwoLayers(router="sigmoid", bias_update_rate=0.25)
    before = model.first.router.bias.copy()
    x = np.random.default_rng(5).standard_normal((2, 3, D_MODEL))
    step_loss(model, (x,))
    step_loss(model, (x,))
    assert np.abs(model.first.router.bias - before).max() > 0.3  # two updates of 0.25 each moved some entries


def test_all_reduce_receives_the_step_counts():
    model = TwoLayers(router="softmax", balance="global")
    seen = []

    def all_reduce(counts):
        seen.append(counts.copy())
        return 2 * counts  # as if a second rank had routed the same tokens

    x = np.random.default_rng(7).standard_normal((4, 3, D_MODEL))
    kept = []
    accumulate_gradients(model, lambda batch: step_loss(model, batch)[0], split_micro_batches((x,), 2), all_reduce=all_reduce,
                         after_each=lambda index, result: kept.append(model.first.stats.kept_per_expert.sum()))
    assert len(seen) == 2 and all(counts.sum() == 4 * 3 * 2 for counts in seen)  # T·k assignments per layer
    assert kept == [2 * 3 * 2, 2 * 3 * 2]  # once per micro-batch of the real pass, not of the counting pass


def test_split_micro_batches_refuses_uneven_batches():
    with pytest.raises(ValueError, match="batch size 5 is not a multiple of n_micro_batches=2"):
        split_micro_batches((np.zeros((5, 2)),), 2)
    with pytest.raises(ValueError, match="n_micro_batches=0 must be >= 1"):
        split_micro_batches((np.zeros((4, 2)),), 0)
    with pytest.raises(TypeError, match="n_micro_batches=2.0 must be an int"):
        split_micro_batches((np.zeros((4, 2)),), 2.0)
    with pytest.raises(ValueError, match=r"different leading sizes \[3, 4\]"):
        split_micro_batches((np.zeros((4, 2)), np.zeros((3, 2))), 1)
    with pytest.raises(ValueError, match="micro_batches is empty"):
        accumulate_gradients(TwoLayers(), lambda batch: None, [])


def test_split_micro_batches_takes_consecutive_equal_rows():
    inputs, targets = np.arange(12).reshape(6, 2), np.arange(6)
    micro = split_micro_batches((inputs, targets), 3)
    for j, (x, y) in enumerate(micro):  # the oracle: rows [2j, 2j + 2)
        np.testing.assert_array_equal(x, [[4 * j, 4 * j + 1], [4 * j + 2, 4 * j + 3]])
        np.testing.assert_array_equal(y, [2 * j, 2 * j + 1])


def test_merging_micro_batch_results_follows_plain_loops():
    rng = np.random.default_rng(0)
    parts = [{"total": float(rng.random()), "aux": float(rng.random())} for _ in range(3)]
    merged = merge_loss_parts(parts)
    assert list(merged) == ["total", "aux"] and all(type(value) is float for value in merged.values())
    for key in ("total", "aux"):
        assert merged[key] == pytest.approx((parts[0][key] + parts[1][key] + parts[2][key]) / 3, rel=1e-15)
    assert mean_over_micro_batches(iter([1.0, 2.0, 6.0])) == 3.0
    counts = [[(np.array([1, 2]), 0.25, np.array([0, 3, 1])), (np.array([5, 0, 1]), 0.0, np.array([2, 2]))],
              [(np.array([3, 4]), 0.75, np.array([1, 0, 0])), (np.array([0, 0, 6]), 0.5, np.array([0, 4]))]]
    merged = merge_layer_counts(counts)
    assert len(merged) == 2
    np.testing.assert_array_equal(merged[0][0], [4, 6])
    np.testing.assert_array_equal(merged[0][2], [1, 3, 1])
    np.testing.assert_array_equal(merged[1][0], [5, 0, 7])
    np.testing.assert_array_equal(merged[1][2], [2, 6])
    assert (merged[0][1], merged[1][1]) == (0.5, 0.25)
