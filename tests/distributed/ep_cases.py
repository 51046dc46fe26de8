"""Expert- and data-parallel checks, one SPMD script on every rank (test_expert_parallel_mpi.py launches it):

    mpiexec -n 2 python tests/distributed/ep_cases.py
    mpiexec -n 4 python tests/distributed/ep_cases.py

The oracle is the single-process layer or model, run on every rank on the whole (concatenated) batch, which
every rank draws from the same seeds: outputs and gradients of the expert-parallel run must equal it
(float64, 1e-12). Capacity routing and expert choice act per rank's token group, so there the oracle applies
the single-process layer to each group separately. A failing assert ends every rank (abort_on_error).
"""
import os
import sys
import tempfile

import numpy as np

import tinymoe as tm
from tinymoe.distributed import MPICommunicator, abort_on_error, world
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.nn.expert_parallel import ExpertParallelMoE, expert_parallel
from tinymoe.optim import AdamW, clip_grad_norm
from tinymoe.train.checkpoint import load_checkpoint, save_checkpoint
from tinymoe.train.distributed import (distributed_evaluate, distributed_train_step, gather_model_state,
                                       gather_optimizer_state, localize_checkpoint, reduce_gradients,
                                       sharded_parameters, step_statistics)

TOKENS_PER_RANK, D_MODEL = 6, 5
TOL = dict(rtol=1e-12, atol=1e-12)


def close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, err_msg=what, **TOL)


def group_rows(array, rank):
    return array[rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK]


def probabilities(x, weight, router):
    """The router distribution P used by the load-balance loss, from the formula (router.py)."""
    logits = x @ weight.T
    if router == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
        return scores / scores.sum(axis=1, keepdims=True)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def run_layer(layer, x, cotangent, scale, with_aux):
    """Loss scale·<out, cot> + z (+ aux) (+ importance + load); returns (out, dx, grads by name, layer)."""
    xt = tm.tensor(x, dtype="float64", requires_grad=True)
    out = layer(xt)
    loss = (out * tm.tensor(cotangent, dtype="float64")).sum() * scale + layer.z_loss
    if with_aux:
        loss = loss + layer.aux_loss
        if layer.importance_loss is not None:
            loss = loss + layer.importance_loss + layer.load_loss
    loss.backward()
    return out.numpy(), xt.grad


def case_layer_equals_single_process(comm):
    """EP loss on rank r: L_r = P·<out_r, cot_r> + z_r [+ aux_r + noisy losses], so J = mean_r L_r is the
    single-process loss of the whole batch. After reduce_gradients every parameter gradient is dJ/dθ; the input
    gradient on rank r (rank-local data, never averaged) is P·dJ/dx_r."""
    size, rank, n_experts = comm.size, comm.rank, 2 * comm.size
    total_tokens = size * TOKENS_PER_RANK
    for index, (router, capacity_factor, shared) in enumerate([
            ("softmax", None, 0), ("softmax", 1.0, 1), ("sigmoid", None, 0), ("sigmoid", 1.0, 0),
            ("noisy", None, 0), ("noisy", 1.0, 0), ("expert_choice", None, 0), ("expert_choice", 1.0, 1)]):
        per_group = capacity_factor is not None or router == "expert_choice"
        options = dict(d_model=D_MODEL, d_ff=7, n_experts=n_experts, top_k=2, router=router, dtype="float64",
                       capacity_factor=capacity_factor, n_shared_experts=shared,
                       bias_update_rate=0.01 if router == "sigmoid" and not per_group else None)
        x = np.random.default_rng([20, index]).standard_normal((total_tokens, D_MODEL))
        cotangent = np.random.default_rng([21, index]).standard_normal((total_tokens, D_MODEL))
        single = tm.nn.MoE(**options, generator=index)
        layer = ExpertParallelMoE(**options, comm=comm, generator=index)
        if router == "noisy":  # noise off: in training mode each rank draws its own rows of noise
            single.eval(), layer.eval()
        what = f"{router} capacity_factor={capacity_factor}"

        out, dx = run_layer(layer, group_rows(x, rank), group_rows(cotangent, rank), size, not per_group)
        reduce_gradients(layer.parameters(), comm, sharded_parameters(layer))
        if per_group:  # the single-process layer on each token group (gradients accumulate): P·J in all
            expected = [run_layer(single, group_rows(x, g), group_rows(cotangent, g), size, False)
                        for g in range(size)]
            expected_out, expected_dx = expected[rank]
            dx_scale, grad_scale = 1.0, 1.0 / size
        else:  # one call on the whole batch: J itself
            expected_out, expected_dx = run_layer(single, x, cotangent, 1.0, True)
            expected_out, expected_dx = group_rows(expected_out, rank), group_rows(expected_dx, rank)
            dx_scale, grad_scale = 1.0 / size, 1.0
        close(out, expected_out, f"{what}: output")
        close(dx * dx_scale, expected_dx, f"{what}: input gradient")
        lo, hi = layer.expert_range.start, layer.expert_range.stop
        single_grads = dict(single.named_parameters())
        for name, parameter in layer.named_parameters():
            reference = single_grads[name].grad * grad_scale
            close(parameter.grad, reference[lo:hi] if name.startswith("experts.") else reference,
                  f"{what}: gradient of {name}")
        if options["bias_update_rate"]:  # updated once, with the global load
            assert np.abs(layer.router.bias).sum() > 0
            np.testing.assert_array_equal(layer.router.bias, single.router.bias, err_msg=f"{what}: bias")
        if per_group:  # aux = E·Σ_e f_e P_e^r: f from the global counts, P from this rank's group
            requested = np.zeros(n_experts)
            for g in range(size):
                single(tm.tensor(group_rows(x, g), dtype="float64"))
                requested += single.stats.requested_per_expert
            f = requested / requested.sum()
            p = probabilities(group_rows(x, rank), single.router.weight.numpy(), router).mean(axis=0)
            close(float(layer.aux_loss.numpy()), n_experts * float((f * p).sum()), f"{what}: aux_loss")
        if router == "noisy":  # the CV² losses of the whole batch (routing does not depend on capacity)
            single(tm.tensor(x, dtype="float64"))
            close(float(layer.importance_loss.numpy()), float(single.importance_loss.numpy()), f"{what}: importance")
            close(float(layer.load_loss.numpy()), float(single.load_loss.numpy()), f"{what}: load")


def case_noisy_training_mode_gradient(comm):
    """Training mode with noise and jitter (each rank draws its own rows, so there is no single-process twin):
    the gradient of J = mean_r L_r, L_r = P·<out_r, cot_r> + aux_r + importance + load, along a direction of
    every parameter equals the central difference of J (reseeding replays the same noise), and the global
    CV² losses are the same on every rank."""
    options = dict(d_model=D_MODEL, d_ff=7, n_experts=2 * comm.size, top_k=2, router="noisy", dtype="float64",
                   jitter=0.05)
    layer = ExpertParallelMoE(**options, comm=comm, generator=7)
    layer.router.noise_weight.data[...] = np.random.default_rng(8).standard_normal(layer.router.noise_weight.shape)
    x = group_rows(np.random.default_rng(9).standard_normal((comm.size * TOKENS_PER_RANK, D_MODEL)), comm.rank)
    cotangent = group_rows(np.random.default_rng(10).standard_normal((comm.size * TOKENS_PER_RANK, D_MODEL)),
                           comm.rank)

    def objective():
        layer.reseed(11)
        out = layer(tm.tensor(x, dtype="float64"))
        local = (out * tm.tensor(cotangent, dtype="float64")).sum() * comm.size + layer.aux_loss
        local = local + layer.importance_loss + layer.load_loss
        return local, float(comm.allreduce_mean(np.array([float(local.numpy())]))[0])

    local, _ = objective()
    values = comm.allgather_rows(np.array([[float(layer.importance_loss.numpy()), float(layer.load_loss.numpy())]]))
    assert (values == values[0]).all(), values
    local.backward()
    reduce_gradients(layer.parameters(), comm, sharded_parameters(layer))
    directions = {name: np.random.default_rng([12, len(name)]).standard_normal(p.shape)
                  for name, p in layer.named_parameters()}
    analytic = sum(float((p.grad * directions[name]).sum()) for name, p in layer.named_parameters())
    analytic = float(comm.allreduce_sum(np.array([analytic]))[0])  # expert slices: every rank's part
    analytic -= (comm.size - 1) * sum(float((p.grad * directions[name]).sum()) for name, p in
                                      layer.named_parameters() if not name.startswith("experts."))
    step, originals = 1e-6, {name: p.data.copy() for name, p in layer.named_parameters()}
    estimates = []
    for sign in (1, -1):
        for name, p in layer.named_parameters():
            p.data[...] = originals[name] + sign * step * directions[name]
        estimates.append(objective()[1])
    for name, p in layer.named_parameters():
        p.data[...] = originals[name]
    numeric = (estimates[0] - estimates[1]) / (2 * step)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def case_every_token_to_one_expert(comm):
    """The most uneven routing: every token of every rank picks expert E-1 (top-1), so the last rank gets all
    rows and the others none, in both directions; outputs and gradients still equal the single-process layer."""
    size, rank, n_experts = comm.size, comm.rank, 2 * comm.size
    options = dict(d_model=D_MODEL, d_ff=3, n_experts=n_experts, top_k=1, router="softmax", dtype="float64")
    x = np.abs(np.random.default_rng(40).standard_normal((size * TOKENS_PER_RANK, D_MODEL))) + 0.1
    cotangent = np.random.default_rng(41).standard_normal(x.shape)
    single, layer = tm.nn.MoE(**options, generator=4), ExpertParallelMoE(**options, comm=comm, generator=4)
    for model in (single, layer):
        model.router.weight.data[-1] += 5.0  # positive inputs: expert E-1 wins for every token
    out, dx = run_layer(layer, group_rows(x, rank), group_rows(cotangent, rank), size, True)
    reduce_gradients(layer.parameters(), comm, sharded_parameters(layer))
    expected_out, expected_dx = run_layer(single, x, cotangent, 1.0, True)
    assert layer.exchange_stats.rows_received == (size * TOKENS_PER_RANK if rank == size - 1 else 0)
    close(out, group_rows(expected_out, rank), "one expert: output")
    close(dx / size, group_rows(expected_dx, rank), "one expert: input gradient")
    lo, hi = layer.expert_range.start, layer.expert_range.stop
    single_grads = dict(single.named_parameters())
    for name, parameter in layer.named_parameters():
        reference = single_grads[name].grad
        close(parameter.grad, reference[lo:hi] if name.startswith("experts.") else reference, f"one expert: {name}")


def case_exchange_meter_counts_every_all_to_all(comm):
    """Dropless top-2: rank r sends its 2·T_r assignments and receives every rank's assignments to its experts
    (counted here from the all-gathered expert ids); forward and backward move (sent + received) rows each,
    so bytes_sent = bytes_received = 2·(sent + received)·d·8 for float64 rows of width d."""
    size, rank, n_experts = comm.size, comm.rank, 2 * comm.size
    layer = ExpertParallelMoE(d_model=D_MODEL, d_ff=3, n_experts=n_experts, top_k=2, dtype="float64",
                              comm=comm, generator=5)
    x = np.random.default_rng([42, rank]).standard_normal((TOKENS_PER_RANK, D_MODEL))
    run_layer(layer, x, np.ones_like(x), 1.0, False)
    every_id = comm.allgather_rows(np.ascontiguousarray(layer.last_decisions[0]))
    received = sum(1 for expert in every_id.reshape(-1) if expert in layer.expert_range)
    sent = TOKENS_PER_RANK * 2
    stats = layer.exchange_stats
    assert (stats.rows_sent, stats.rows_received) == (sent, received), (stats, sent, received)
    assert stats.bytes_sent == stats.bytes_received == 2 * (sent + received) * D_MODEL * 8, (stats, sent, received)
    assert comm.allreduce_sum(np.array([received]))[0] == size * sent and stats.seconds > 0


def case_bad_input_and_non_finite_output_raise_as_moe(comm):
    """Every rank gets the same bad input (or NaN in every expert): each raises what MoE raises, word for word."""
    options = dict(d_model=D_MODEL, d_ff=3, n_experts=2 * comm.size, top_k=2, dtype="float64", name="blocks.1.ffn")
    single, layer = tm.nn.MoE(**options, generator=6), ExpertParallelMoE(**options, comm=comm, generator=6)
    x = np.random.default_rng([43, comm.rank]).standard_normal((TOKENS_PER_RANK, D_MODEL))
    bad_inputs = [tm.tensor(x, dtype="float32"), tm.tensor(x[:, :-1]), tm.tensor(x[:0]), x]
    for model in (single, layer):
        model.experts.w2.data[:, 0, 0] = np.nan
    for bad, expected in zip(bad_inputs + [tm.tensor(x)], [TypeError, ValueError, ValueError, TypeError,
                                                            FloatingPointError]):
        errors = []
        for model in (single, layer):
            try:
                with np.errstate(invalid="ignore"):
                    model(bad)
            except Exception as error:  # noqa: BLE001 - the exception itself is compared
                errors.append(error)
        assert len(errors) == 2 and all(type(error) is expected for error in errors), (expected, errors)
        assert str(errors[1]) == str(errors[0]) and str(errors[0]).startswith("MoE 'blocks.1.ffn': "), errors
    assert "expert output is not finite" in str(errors[1])


def case_divisibility_error(comm):
    try:
        ExpertParallelMoE(d_model=4, d_ff=4, n_experts=comm.size + 1, top_k=1, comm=comm, generator=0)
    except ValueError as error:
        assert f"n_experts={comm.size + 1} is not divisible by the {comm.size} ranks" in str(error), error
    else:
        raise AssertionError("n_experts not divisible by P must raise")


def case_global_and_sequence_balance_over_micro_batches_and_ranks(comm):
    """balance="global" (Qiu et al. 2025) and "sequence" (DeepSeek-V3) under expert parallelism with 2
    micro-batches per rank (accumulate_gradients, all_reduce over the ranks): the step equals one process
    computing one call on the whole batch of 2·P micro-batches (float64, 1e-12): loss, every parameter
    gradient, the input gradient, and the sigmoid router's one bias update from the load of the whole step.

    Micro-batch j of rank r holds sequences (j·P + r)·B_r ... of the big batch (B_r = 2 sequences of L = 3).
    L_jr = <out, cot>/T_r + aux + z (means over the jr tokens), J = mean_jr L_jr is the big batch's mean loss;
    after reduce_gradients every parameter gradient is dJ/dθ and the input gradient of rank r is P·dJ/dx."""
    from tinymoe.train.accumulation import accumulate_gradients

    size, rank, n_experts, n_micro, per_batch, length = comm.size, comm.rank, 2 * comm.size, 2, 2, 3
    for index, (router, balance) in enumerate([("softmax", "global"), ("sigmoid", "global"),
                                               ("softmax", "sequence")]):
        options = dict(d_model=D_MODEL, d_ff=7, n_experts=n_experts, top_k=2, router=router, dtype="float64",
                       balance=balance, bias_update_rate=0.01 if router == "sigmoid" else None)
        what = f"{router} balance={balance}"
        n_sequences = n_micro * size * per_batch
        x = np.random.default_rng([40, index]).standard_normal((n_sequences, length, D_MODEL))
        cotangent = np.random.default_rng([41, index]).standard_normal((n_sequences, length, D_MODEL))
        single = tm.nn.MoE(**options, generator=index)
        layer = ExpertParallelMoE(**options, comm=comm, generator=index)

        def loss_of(moe, inputs, cot):
            out = moe(inputs)
            return (out * tm.tensor(cot, dtype="float64")).sum() / (cot.size // D_MODEL) + moe.aux_loss + moe.z_loss

        big = tm.tensor(x, dtype="float64", requires_grad=True)
        expected = loss_of(single, big, cotangent)
        expected.backward()

        mine = [slice((j * size + rank) * per_batch, (j * size + rank + 1) * per_batch) for j in range(n_micro)]
        inputs = [tm.tensor(x[rows], dtype="float64", requires_grad=True) for rows in mine]
        batches = [(inputs[j], cotangent[rows]) for j, rows in enumerate(mine)]
        losses = accumulate_gradients(layer, lambda batch: loss_of(layer, *batch), batches,
                                      all_reduce=comm.allreduce_sum)
        reduce_gradients(layer.parameters(), comm, sharded_parameters(layer))
        step_loss = comm.allreduce_mean(np.array([np.mean([float(loss.numpy()) for loss in losses])]))[0]
        close(step_loss, float(expected.numpy()), f"{what}: loss")
        for j, rows in enumerate(mine):
            close(inputs[j].grad, size * big.grad[rows], f"{what}: input gradient of micro-batch {j}")
        lo, hi = layer.expert_range.start, layer.expert_range.stop
        single_grads = dict(single.named_parameters())
        for name, parameter in layer.named_parameters():
            reference = single_grads[name].grad
            close(parameter.grad, reference[lo:hi] if name.startswith("experts.") else reference,
                  f"{what}: gradient of {name}")
        assert layer.router.global_load is None  # cleared after the step
        if router == "sigmoid":  # one update, from the load of the whole step on every rank
            assert np.abs(layer.router.bias).sum() > 0
            np.testing.assert_array_equal(layer.router.bias, single.router.bias, err_msg=f"{what}: bias")
        if balance == "global":  # the oracle of the oracle: f from a plain count of the big batch's top-2
            p = probabilities(x.reshape(-1, D_MODEL), single.router.weight.numpy(), router)
            logits = x.reshape(-1, D_MODEL) @ single.router.weight.numpy().T
            scores = p if router == "softmax" else 1 / (1 + np.exp(-logits))
            chosen = np.argsort(-scores, axis=1, kind="stable")[:, :2]
            f = np.bincount(chosen.reshape(-1), minlength=n_experts) / chosen.size
            close(float(single.aux_loss.numpy()), n_experts * float((f * p.mean(axis=0)).sum()), f"{what}: aux")


MODEL = dict(vocab_size=11, d_model=8, n_layers=2, n_heads=2, max_seq_len=6, dtype="float64",
             moe={"d_ff": 6, "n_experts": 4, "top_k": 2})
BATCH, STEPS = 4, 3


def batches(steps, seed=30):
    generator = np.random.default_rng(seed)
    return [(generator.integers(0, 11, size=(BATCH, 6)), generator.integers(0, 11, size=(BATCH, 6)))
            for _ in range(steps)]


def make(config, comm=None):
    model = MoETransformer(config, seed=1)
    if comm is not None:
        expert_parallel(model, comm)
    return model, AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def single_process_run(config, data):
    model, optimizer = make(config)
    losses = []
    for inputs, targets in data:
        total, parts = model.loss(inputs, targets)
        optimizer.zero_grad()
        total.backward()
        clip_grad_norm(optimizer.parameters(), 0.5)  # small: clipping is active
        optimizer.step()
        losses.append(parts["total"])
    return model, optimizer, losses


def case_training_equals_single_process(comm):
    for router in ("softmax", "sigmoid"):
        moe = dict(MODEL["moe"], router=router, bias_update_rate=0.01 if router == "sigmoid" else None)
        config = TransformerConfig(**dict(MODEL, moe=moe))
        data = batches(STEPS)
        reference, reference_optimizer, reference_losses = single_process_run(config, data)
        runs = []
        for _ in range(2):  # twice: the same seed and P give the same bits
            model, optimizer = make(config, comm)
            losses = [distributed_train_step(model, optimizer, inputs, targets, comm, 0.5)["total"]
                      for inputs, targets in data]
            runs.append((model, optimizer, losses))
        model, optimizer, losses = runs[0]
        close(losses, reference_losses, f"{router}: training losses")
        assert runs[1][2] == losses, (runs[1][2], losses)
        state = gather_model_state(model, comm)
        for name, value in reference.state_dict().items():
            close(state[name], value, f"{router}: parameter {name} after {STEPS} steps")
        optimizer_state = gather_optimizer_state(optimizer, model, comm)
        for position, entry in reference_optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                close(optimizer_state["state"][position][key], value, f"{router}: optimizer {position}/{key}")
        stats = step_statistics(model, comm)
        assert np.sum(stats["tokens_per_expert"][0]) == BATCH * 6 * 2, stats  # dropless: T·k rows per layer
        assert all(rows > 0 for rows in stats["bytes_sent"][0]) and len(stats["rows_received"][0]) == comm.size
        val = distributed_evaluate(model, data[:1], comm)
        reference.eval()
        close(val, reference.loss(*data[0])[1]["cross_entropy"], f"{router}: validation loss")


def case_grad_accum_training_equals_one_big_batch(comm):
    """--grad-accum 2 under expert parallelism (ParallelTraining.step): with balance="global" and dropless
    routing, 3 steps of 2 micro-batches x P ranks equal one process taking 3 steps on the whole batches
    (float64, 1e-12): losses, parameters, optimizer moments, the sigmoid bias; the step's statistics count
    every micro-batch of every rank."""
    from tinymoe.train.distributed import ParallelTraining

    for router in ("softmax", "sigmoid"):
        moe = dict(MODEL["moe"], router=router, balance="global",
                   bias_update_rate=0.01 if router == "sigmoid" else None)
        config = TransformerConfig(**dict(MODEL, moe=moe))
        data = [(np.concatenate([a, c]), np.concatenate([b, d])) for (a, b), (c, d)
                in zip(batches(STEPS, seed=50), batches(STEPS, seed=51))]  # 2·BATCH sequences a step
        reference, reference_optimizer, reference_losses = single_process_run(config, data)
        model, optimizer = make(config, comm)
        parallel = ParallelTraining(comm, BATCH, grad_accum=2)
        parallel.sharded = sharded_parameters(model)
        losses = []
        for inputs, targets in data:
            losses.append(parallel.step(model, optimizer, inputs, targets, 0.5)["total"])
            layer_counts, _ = parallel.layer_statistics(model)
            assert [int(kept.sum()) for kept, _, _ in layer_counts] == [2 * BATCH * 6 * 2] * 2, layer_counts
            assert [h.tolist() for _, _, h in layer_counts] == [[0, 0, 2 * BATCH * 6]] * 2, layer_counts
        close(losses, reference_losses, f"{router}: training losses")
        state = gather_model_state(model, comm)
        for name, value in reference.state_dict().items():
            close(state[name], value, f"{router}: parameter {name} after {STEPS} steps")
        optimizer_state = gather_optimizer_state(optimizer, model, comm)
        for position, entry in reference_optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                close(optimizer_state["state"][position][key], value, f"{router}: optimizer {position}/{key}")
        val = parallel.evaluate(model, data[:1])
        reference.eval()
        close(val, reference.loss(*data[0])[1]["cross_entropy"], f"{router}: validation loss")


def case_checkpoint_round_trip_and_resume_under_other_sizes(comm):
    """Train 2 steps on P ranks, write the checkpoint (one-process format) from rank 0, resume it under every
    P' in {1, 2, 4} with P' <= P (groups of P' ranks, each a whole replica) for one more step: every result
    equals the single-process 3-step run; gathering right after the load gives the file's tensors back."""
    config = TransformerConfig(**MODEL)
    data = batches(STEPS)
    reference, _, reference_losses = single_process_run(config, data)
    model, optimizer = make(config, comm)
    for inputs, targets in data[:2]:
        distributed_train_step(model, optimizer, inputs, targets, comm, 0.5)
    state, optimizer_state = gather_model_state(model, comm), gather_optimizer_state(optimizer, model, comm)
    directory = comm.broadcast(np.frombuffer(tempfile.mkdtemp().encode().ljust(200), dtype=np.uint8).copy()
                               if comm.rank == 0 else np.zeros(200, dtype=np.uint8))
    path = os.path.join(bytes(directory).decode().strip(), "checkpoint.npz")
    if comm.rank == 0:
        save_checkpoint(path, state, optimizer_state, {"step": 2})
    comm.barrier()
    checkpoint = load_checkpoint(path)
    for group_size in (1, 2, 4):
        if group_size > comm.size:
            continue
        group = MPICommunicator(comm.comm.Split(comm.rank // group_size, comm.rank))
        resumed, resumed_optimizer = make(config, group)
        local = localize_checkpoint(checkpoint, resumed, resumed_optimizer, group)
        resumed.load_state_dict(local.model_state)
        resumed_optimizer.load_state_dict(local.optimizer_state)
        again = gather_model_state(resumed, group)
        for name, value in state.items():
            np.testing.assert_array_equal(again[name], value, err_msg=f"P'={group_size}: round trip of {name}")
        loss = distributed_train_step(resumed, resumed_optimizer, *data[2], group, 0.5)["total"]
        close(loss, reference_losses[2], f"P'={group_size}: loss of the step after resume")
        final = gather_model_state(resumed, group)
        for name, value in reference.state_dict().items():
            close(final[name], value, f"P'={group_size}: {name} after resume")
        group.comm.Free()
    comm.barrier()
    if comm.rank == 0:
        os.remove(path)
        os.rmdir(os.path.dirname(path))


CASES = [case_layer_equals_single_process, case_noisy_training_mode_gradient, case_every_token_to_one_expert,
         case_exchange_meter_counts_every_all_to_all, case_bad_input_and_non_finite_output_raise_as_moe,
         case_divisibility_error, case_global_and_sequence_balance_over_micro_batches_and_ranks,
         case_training_equals_single_process, case_grad_accum_training_equals_one_big_batch,
         case_checkpoint_round_trip_and_resume_under_other_sizes]


def main():
    comm = world()
    with abort_on_error(comm):
        if not isinstance(comm, MPICommunicator):
            raise SystemExit("ep_cases.py must run under mpiexec with 2 or more ranks")
        for case in CASES:
            case(comm)
            comm.barrier()
    if comm.rank == 0:
        print(f"ep_cases: {len(CASES)} cases passed on {comm.size} ranks")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
