"""Expert parallelism in one process (LocalCommunicator, P = 1): the layer and the training helpers must equal
the plain single-process code, and bad input must fail early with a clear message. The multi-rank checks are
ep_cases.py (test_expert_parallel_mpi.py)."""
import re

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.distributed import LocalCommunicator
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.nn.expert_parallel import ExpertParallelMoE, expert_parallel
from tinymoe.optim import AdamW, clip_grad_norm
from tinymoe.train.checkpoint import Checkpoint
from tinymoe.train.distributed import (distributed_train_step, expert_shards, gather_model_state,
                                       gather_optimizer_state, localize_checkpoint, split_batch, step_statistics)


class ThreeRanks(LocalCommunicator):
    """Claims rank 1 of 3 (no collective is called before the checks under test)."""

    rank, size = 1, 3


def run(layer, x, cotangent):
    xt = tm.tensor(x, dtype="float64", requires_grad=True)
    out = layer(xt)
    loss = (out * tm.tensor(cotangent, dtype="float64")).sum() + layer.aux_loss + layer.z_loss
    if layer.importance_loss is not None:
        loss = loss + layer.importance_loss + layer.load_loss
    loss.backward()
    return out.numpy(), xt.grad, {name: p.grad for name, p in layer.named_parameters()}


@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_one_rank_layer_equals_the_moe_layer_in_training_mode(router, capacity_factor):
    # Training mode with jitter and (noisy) noise: at P = 1 the replayed noise must be the router's own.
    options = dict(d_model=6, d_ff=8, n_experts=4, top_k=2, router=router, dtype="float64", jitter=0.1,
                   capacity_factor=capacity_factor, n_shared_experts=1,
                   bias_update_rate=0.05 if router == "sigmoid" else None)
    x = np.random.default_rng(0).standard_normal((2, 9, 6))
    cotangent = np.random.default_rng(1).standard_normal((2, 9, 6))
    single = tm.nn.MoE(**options, generator=3)
    layer = ExpertParallelMoE(**options, comm=LocalCommunicator(), generator=3)
    expected_out, expected_dx, expected_grads = run(single, x, cotangent)
    out, dx, grads = run(layer, x, cotangent)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-13)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        np.testing.assert_allclose(grads[name], expected_grads[name], rtol=1e-12, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(layer.stats.kept_per_expert, single.stats.kept_per_expert)
    if router == "sigmoid":
        np.testing.assert_array_equal(layer.router.bias, single.router.bias)
    assert layer.exchange_stats.rows_sent == layer.exchange_stats.rows_received == single.stats.kept_per_expert.sum()
    # two all-to-alls of rows in forward (out and back) and two in backward, float64 rows of width 6
    assert layer.exchange_stats.bytes_sent == 4 * layer.exchange_stats.rows_sent * 6 * 8


def test_experts_not_divisible_by_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="n_experts=4 is not divisible by the 3 ranks"):
        ExpertParallelMoE(d_model=4, d_ff=4, n_experts=4, top_k=1, comm=ThreeRanks(), generator=0)
    with pytest.raises(TypeError, match="comm must be a tinymoe.distributed.Communicator"):
        ExpertParallelMoE(d_model=4, d_ff=4, n_experts=4, top_k=1, comm="world", generator=0)
    with pytest.raises(TypeError, match="single-process MoE"):
        ExpertParallelMoE.from_moe(tm.nn.Linear(2, 2), LocalCommunicator())


def test_a_rank_keeps_its_slice_of_the_experts():
    class SecondOfThree(LocalCommunicator):
        rank, size = 1, 3

    moe = tm.nn.MoE(d_model=4, d_ff=5, n_experts=6, top_k=2, generator=0)
    layer = ExpertParallelMoE.from_moe(moe, SecondOfThree())
    assert list(layer.expert_range) == [2, 3] and layer.experts.n_experts == 2
    np.testing.assert_array_equal(layer.experts.w2.numpy(), moe.experts.w2.numpy()[2:4])
    assert moe.experts.w1.shape == (6, 5, 4)  # the given layer is unchanged
    assert layer.router is moe.router  # replicated parts are the same objects


def test_expert_parallel_replaces_every_moe_layer_of_a_model():
    config = TransformerConfig(vocab_size=7, d_model=8, n_layers=3, n_heads=2, moe_layers=[0, 2],
                               moe={"d_ff": 4, "n_experts": 2, "top_k": 1})
    model = MoETransformer(config, seed=0)
    names = list(model.state_dict())
    expert_parallel(model, LocalCommunicator())
    assert [type(layer).__name__ for layer in model.moe_layers()] == ["ExpertParallelMoE"] * 2
    assert list(model.state_dict()) == names
    assert sorted(expert_shards(model)) == [f"blocks.{i}.ffn.experts.{w}" for i in (0, 2) for w in ("w1", "w2", "w3")]


def test_split_batch_takes_the_ranks_rows_and_refuses_an_uneven_batch():
    inputs, targets = np.arange(12).reshape(6, 2), np.arange(12).reshape(6, 2) + 100

    class SecondOfTwo(LocalCommunicator):
        rank, size = 1, 2

    mine, theirs = split_batch(inputs, targets, SecondOfTwo())
    np.testing.assert_array_equal(mine, inputs[3:])
    np.testing.assert_array_equal(theirs, targets[3:])
    with pytest.raises(ValueError, match="batch of 6 sequences .* not divisible by the 4 ranks"):
        split_batch(inputs, targets, type("FourRanks", (LocalCommunicator,), {"rank": 0, "size": 4})())
    with pytest.raises(ValueError, match="inputs hold 6 sequences but targets have shape"):
        split_batch(inputs, targets[:5], SecondOfTwo())


def test_one_rank_training_step_equals_the_plain_loop():
    config = TransformerConfig(vocab_size=9, d_model=8, n_layers=1, n_heads=2, max_seq_len=5, dtype="float64",
                               moe={"d_ff": 4, "n_experts": 2, "top_k": 1})
    generator = np.random.default_rng(5)
    data = [(generator.integers(0, 9, (2, 5)), generator.integers(0, 9, (2, 5))) for _ in range(3)]
    plain = MoETransformer(config, seed=2)
    parallel = expert_parallel(MoETransformer(config, seed=2), LocalCommunicator())
    plain_optimizer, parallel_optimizer = AdamW(plain.parameters(), lr=0.05), AdamW(parallel.parameters(), lr=0.05)
    for inputs, targets in data:
        total, parts = plain.loss(inputs, targets)
        plain_optimizer.zero_grad()
        total.backward()
        norm = clip_grad_norm(plain_optimizer.parameters(), 0.3)
        step = distributed_train_step(parallel, parallel_optimizer, inputs, targets, LocalCommunicator(), 0.3)
        assert abs(step["total"] - parts["total"]) < 1e-12 and abs(step["grad_norm"] - norm) < 1e-12
        plain_optimizer.step()
    gathered = gather_model_state(parallel, LocalCommunicator())
    for name, value in plain.state_dict().items():
        np.testing.assert_allclose(gathered[name], value, rtol=1e-12, atol=1e-14, err_msg=name)
    stats = step_statistics(parallel, LocalCommunicator())
    assert stats["tokens_per_expert"][0] == plain.moe_layers()[0].stats.kept_per_expert.tolist()
    assert stats["rows_received"] == [[30]]  # 3 steps of 2·5 tokens, k = 1: everything since the last reset
    assert parallel.moe_layers()[0].exchange_stats.rows_received == 0  # step_statistics reset the meter


def test_localize_checkpoint_refuses_expert_tensors_of_another_size():
    layer = ExpertParallelMoE(d_model=4, d_ff=4, n_experts=2, top_k=1, comm=LocalCommunicator(), generator=0)
    optimizer = AdamW(layer.parameters())
    state = gather_model_state(layer, LocalCommunicator())
    state["experts.w1"] = state["experts.w1"][:1]
    checkpoint = Checkpoint(meta={}, model_state=state, optimizer_state=gather_optimizer_state(optimizer, layer,
                                                                                               LocalCommunicator()))
    with pytest.raises(ValueError, match=r"model/experts.w1 has shape \(1, 4, 4\); expected the whole 2 experts"):
        localize_checkpoint(checkpoint, layer, optimizer, LocalCommunicator())


def test_the_layers_collective_ops_pass_gradcheck_on_one_rank():
    from tinymoe.functional.all_to_all import ExchangeRows
    from tinymoe.nn.expert_parallel import AllGatherRows, ExchangeStats

    comm, meter = LocalCommunicator(), ExchangeStats()
    rows = tm.tensor(np.random.default_rng(3).standard_normal((5, 3)), dtype="float64", requires_grad=True)
    weights = tm.tensor(np.random.default_rng(4).standard_normal((5, 3)), dtype="float64")
    counts = np.array([5])
    assert tm.gradcheck(lambda r: (ExchangeRows.apply(r, counts, counts, comm, meter.record) * weights).sum(), [rows])
    assert tm.gradcheck(lambda r: (AllGatherRows.apply(r, comm) ** 2 * weights).sum(), [rows])
    assert meter.rows_sent == 0 and meter.bytes_sent > 0  # rows_* count the layer's dispatch, bytes every call


def test_the_exchange_meter_sees_forward_and_backward_with_each_directions_counts():
    """meter(rows, send_counts, recv_counts, seconds) once per all-to-all; the backward's counts are swapped."""
    from tinymoe.functional.all_to_all import exchange_rows
    from tinymoe.nn.expert_parallel import ExchangeStats

    calls, stats = [], ExchangeStats()

    def meter(rows, send_counts, recv_counts, seconds):
        calls.append((rows.shape, send_counts.tolist(), recv_counts.tolist(), seconds))
        stats.record(rows, send_counts, recv_counts, seconds)

    rows = tm.tensor(np.random.default_rng(5).standard_normal((4, 3)), dtype="float32", requires_grad=True)
    out = exchange_rows(rows, [4], [4], LocalCommunicator(), meter=meter)
    np.testing.assert_array_equal(out.numpy(), rows.numpy())  # one rank: the identity, metered or not
    out.backward(np.ones((4, 3), dtype="float32"))
    assert [call[:3] for call in calls] == [((4, 3), [4], [4])] * 2
    assert all(call[3] >= 0 for call in calls)
    assert stats.bytes_sent == stats.bytes_received == 2 * 4 * 3 * 4  # two calls of 4 float32 rows of width 3
    assert stats.seconds == sum(call[3] for call in calls)
    with pytest.raises(TypeError, match="meter must be None or a callable"):
        exchange_rows(rows, [4], [4], LocalCommunicator(), meter=stats)


@pytest.mark.parametrize("options, message", [
    (dict(n_null_experts=2), "does not support n_null_experts=2"),
    (dict(capacity_factor=1.0, capacity_per="sequence"), "capacity_per='sequence' is not supported"),
])
def test_options_the_layer_would_get_wrong_are_refused_naming_them(options, message):
    base = dict(d_model=4, d_ff=4, n_experts=2, top_k=1, generator=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        ExpertParallelMoE(**base, **options, comm=LocalCommunicator())
    with pytest.raises(ValueError, match=re.escape(message)):
        ExpertParallelMoE.from_moe(tm.nn.MoE(**base, **options), LocalCommunicator())


def test_relu_router_is_refused_over_several_ranks_only():
    with pytest.raises(ValueError, match="router='relu' is not supported over 3 ranks"):
        ExpertParallelMoE(d_model=4, d_ff=4, n_experts=6, top_k=2, router="relu", comm=ThreeRanks(), generator=0)
    ExpertParallelMoE(d_model=4, d_ff=4, n_experts=6, top_k=2, router="relu", comm=LocalCommunicator(), generator=0)


@pytest.mark.parametrize("router, extra", [("top_p", dict(top_p=0.6)), ("softmax", dict(capacity_factor=1.0))])
def test_one_rank_layer_with_a_gated_shared_expert_equals_the_moe_layer(router, extra):
    options = dict(d_model=6, d_ff=8, n_experts=4, top_k=2, router=router, dtype="float64", n_shared_experts=1,
                   shared_expert_gate=True, **extra)
    x = np.random.default_rng(2).standard_normal((2, 7, 6))
    cotangent = np.random.default_rng(3).standard_normal((2, 7, 6))
    single = tm.nn.MoE(**options, generator=4)
    layer = ExpertParallelMoE(**options, comm=LocalCommunicator(), generator=4)
    expected_out, expected_dx, expected_grads = run(single, x, cotangent)
    out, dx, grads = run(layer, x, cotangent)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-13)
    for name in expected_grads:
        np.testing.assert_allclose(grads[name], expected_grads[name], rtol=1e-12, atol=1e-13, err_msg=name)
    if router == "top_p":
        assert float(layer.entropy_loss.numpy()) == float(single.entropy_loss.numpy())
    assert layer.stats.experts_per_token == single.stats.experts_per_token


class TwinRanks(LocalCommunicator):
    """One rank whose all-reduce sums two identical ranks' values (as if a twin ran the same batch)."""

    def allreduce_sum(self, array, *, inplace=False):
        return np.asarray(array) * 2


def test_deferred_sigmoid_updates_add_the_global_load_to_pending_load():
    options = dict(d_model=6, d_ff=4, n_experts=4, top_k=2, router="sigmoid", bias_update_rate=0.1, dtype="float64")
    layer = ExpertParallelMoE(**options, comm=TwinRanks(), generator=1).train()
    layer.router.defer_updates = True
    bias = layer.router.bias.copy()
    local = []
    for seed in (5, 6):
        layer(tm.tensor(np.random.default_rng(seed).standard_normal((9, 6)), dtype="float64"))
        local.append(layer.stats.requested_per_expert)
    np.testing.assert_array_equal(layer.router.bias, bias)  # deferred: no step per forward
    np.testing.assert_array_equal(layer.router.pending_load, 2 * (local[0] + local[1]))  # global, not local
    layer.update_bias()  # one step per optimizer step, on the summed global load
    load = 2 * (local[0] + local[1])
    np.testing.assert_allclose(layer.router.bias, bias + 0.1 * np.sign(load.mean() - load))
    assert layer.router.pending_load is None
