"""Multi-rank checks of tinymoe.distributed, run as one SPMD script on every rank:

    mpiexec -n 2 python tests/distributed/mpi_cases.py
    mpiexec -n 4 python tests/distributed/mpi_cases.py

(test_distributed_mpi.py launches both from pytest.) Every rank draws the data of *all* ranks from the same
seeds, so each one computes the expected result of a collective with plain NumPy, independently of the code
under test. A failing assert on any rank ends every rank through `abort_on_error` (non-zero exit status,
"rank R: ..." on stderr) instead of leaving the others waiting in the next collective.
"""
import sys

import numpy as np

import tinymoe as tm
from tinymoe.distributed import MPICommunicator, abort_on_error, plan_expert_exchange, world
from tinymoe.functional.all_to_all import exchange_rows
from tinymoe.functional.dispatch import gather_rows
from tinymoe.functional.indexing import concatenate


def block_starts(counts):
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)


def count_matrix(size, seed, high=4):
    """C[s, p]: rows rank s sends to rank p; zeros included on purpose."""
    return np.random.default_rng(seed).integers(0, high, size=(size, size))


def rows_of(rank, n_rows, shape, dtype, seed):
    values = np.random.default_rng([seed, rank]).standard_normal((n_rows,) + shape) * 10
    return values.astype(dtype) if np.dtype(dtype).kind != "b" else values > 0


def case_alltoall_counts(comm):
    counts = count_matrix(comm.size, seed=1)
    np.testing.assert_array_equal(comm.alltoall_counts(counts[comm.rank]), counts[:, comm.rank])
    per_expert = np.random.default_rng(2).integers(0, 9, size=(comm.size, comm.size, 3))
    np.testing.assert_array_equal(comm.alltoall_counts(per_expert[comm.rank]), per_expert[:, comm.rank])


def case_alltoallv_rows(comm):
    size, rank = comm.size, comm.rank
    for seed, (dtype, shape) in enumerate([("float64", (3,)), ("float32", (2, 3)), ("float16", (1,)),
                                           ("int32", (4,)), ("bool", (2,)), ("float64", (0,))]):
        counts = count_matrix(size, seed=10 + seed)
        data = [rows_of(s, counts[s].sum(), shape, dtype, seed) for s in range(size)]
        received = comm.alltoallv_rows(data[rank], counts[rank], counts[:, rank])
        expected = np.concatenate([data[s][block_starts(counts[s])[rank]:][:counts[s, rank]] for s in range(size)])
        assert received.dtype == np.dtype(dtype) and received.shape == expected.shape, (received.shape, dtype)
        np.testing.assert_array_equal(received, expected)


def case_allgather_rows(comm):
    data = [rows_of(s, s, (2,), "float32", 3) for s in range(comm.size)]  # rank 0 sends no rows
    np.testing.assert_array_equal(comm.allgather_rows(data[comm.rank]), np.concatenate(data))


def case_allreduce(comm):
    parts = [np.random.default_rng([4, s]).standard_normal((5, 3)).astype(np.float32) for s in range(comm.size)]
    in_rank_order = parts[0].copy()
    for part in parts[1:]:
        in_rank_order += part
    np.testing.assert_array_equal(comm.allreduce_sum(parts[comm.rank]), in_rank_order)  # bitwise
    buffer = parts[comm.rank].copy()
    assert comm.allreduce_sum(buffer, inplace=True) is buffer
    np.testing.assert_array_equal(buffer, in_rank_order)
    np.testing.assert_allclose(comm.allreduce_mean(parts[comm.rank]), in_rank_order / comm.size, rtol=1e-6)
    fast = MPICommunicator(comm.comm, deterministic=False)
    np.testing.assert_allclose(fast.allreduce_sum(parts[comm.rank]), in_rank_order, rtol=1e-5, atol=1e-6)
    counts = np.arange(6, dtype=np.int64) * (comm.rank + 1)
    np.testing.assert_array_equal(comm.allreduce_sum(counts), np.arange(6) * sum(range(1, comm.size + 1)))
    # Every rank holds the same bits: gather the sums and compare them.
    sums = comm.allgather_rows(comm.allreduce_sum(parts[comm.rank])[None])
    assert all(np.array_equal(sums[0], other) for other in sums[1:])


def case_broadcast(comm):
    root = comm.size - 1
    payload = np.random.default_rng(5).standard_normal((3, 4))
    mine = payload if comm.rank == root else None
    np.testing.assert_array_equal(comm.broadcast(mine, root=root), payload)
    target = payload.copy() if comm.rank == root else np.zeros((3, 4))
    assert comm.broadcast(target, root=root) is target
    np.testing.assert_array_equal(target, payload)


def case_exchange_rows_forward_backward(comm):
    size, rank, width = comm.size, comm.rank, 3
    counts = count_matrix(size, seed=6)
    data = [rows_of(s, counts[s].sum(), (width,), "float64", 7) for s in range(size)]
    cotangents = [rows_of(p, counts[:, p].sum(), (width,), "float64", 8) for p in range(size)]
    rows = tm.tensor(data[rank], dtype="float64", requires_grad=True)
    out = exchange_rows(rows, counts[rank], counts[:, rank], comm)
    expected = np.concatenate([data[s][block_starts(counts[s])[rank]:][:counts[s, rank]] for s in range(size)])
    np.testing.assert_array_equal(out.numpy(), expected)
    out.backward(cotangents[rank])
    # Row block p of my rows went to rank p, landing after the rows of sources 0..rank-1 there.
    expected_grad = np.concatenate([cotangents[p][block_starts(counts[:, p])[rank]:][:counts[rank, p]]
                                    for p in range(size)])
    np.testing.assert_array_equal(rows.grad, expected_grad)


def case_expert_parallel_round_trip(comm):
    """Steps 1-5 of the design note with a linear expert y = x W_e, against every row times its expert."""
    size, rank, width, n_tokens = comm.size, comm.rank, 3, 7
    n_experts = 2 * size
    weights = np.random.default_rng(9).standard_normal((n_experts, width, width))
    expert_of_token = np.random.default_rng([10, rank]).integers(0, n_experts, size=n_tokens)
    tokens = np.random.default_rng([11, rank]).standard_normal((n_tokens, width))
    by_expert = np.argsort(expert_of_token, kind="stable")
    dispatched_expert = expert_of_token[by_expert]
    dispatched = tm.tensor(tokens[by_expert], dtype="float64", requires_grad=True)

    plan = plan_expert_exchange(np.bincount(expert_of_token, minlength=n_experts), comm)
    received = exchange_rows(dispatched, plan.send_counts, plan.recv_counts, comm)
    expert_major = gather_rows(received, plan.order)
    first_local = rank * (n_experts // size)
    outputs = [expert_major[plan.expert_offsets[e]:plan.expert_offsets[e + 1]]
               @ tm.tensor(weights[first_local + e], dtype="float64") for e in range(n_experts // size)]
    source_major = gather_rows(concatenate(outputs), plan.inverse)
    returned = exchange_rows(source_major, plan.recv_counts, plan.send_counts, comm)

    expected = np.einsum("nd,nde->ne", tokens[by_expert], weights[dispatched_expert])
    np.testing.assert_allclose(returned.numpy(), expected, rtol=1e-12, atol=1e-12)
    cotangent = np.random.default_rng([12, rank]).standard_normal(returned.shape)
    returned.backward(cotangent)
    expected_grad = np.einsum("ne,nde->nd", cotangent, weights[dispatched_expert])
    np.testing.assert_allclose(dispatched.grad, expected_grad, rtol=1e-12, atol=1e-12)


CASES = [case_alltoall_counts, case_alltoallv_rows, case_allgather_rows, case_allreduce, case_broadcast,
         case_exchange_rows_forward_backward, case_expert_parallel_round_trip]


def main():
    comm = world()
    with abort_on_error(comm):
        if not isinstance(comm, MPICommunicator):
            raise SystemExit("mpi_cases.py must run under mpiexec with 2 or more ranks")
        for case in CASES:
            case(comm)
            comm.barrier()
    if comm.rank == 0:
        print(f"mpi_cases: {len(CASES)} cases passed on {comm.size} ranks")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
