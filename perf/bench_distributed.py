"""Skeleton: time the collectives of tinymoe.distributed over MPI (run it under mpiexec).

    mpiexec -n 2 python perf/bench_distributed.py                  # alltoallv_rows and allreduce_sum
    mpiexec -n 4 python perf/bench_distributed.py --rows 4096 --width 512 --repeats 20

Each rank sends an even share of `--rows` float32 rows of `--width` to every rank (the expert-parallel
exchange with perfectly balanced routing) and all-reduces a `--rows` x `--width` float32 array, in rank order
(deterministic=True, the default) and with MPI_Allreduce (deterministic=False). Then one forward + backward of
the expert-parallel MoE layer (tinymoe.nn.expert_parallel: `--rows` tokens per rank, d = `--width`,
E = `--experts-per-rank`·P, k = 2, dropless, softmax router, float32), with the seconds its four all-to-alls
of rows took on the slowest rank. Rank 0 prints one JSON line per row: the median over --repeats of the
slowest rank's time (a collective is as slow as its slowest rank).
Not yet: uneven routing on purpose, CuPy buffers (host staging vs CUDA-aware).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import tinymoe as tm
from tinymoe.distributed import MPICommunicator, abort_on_error, world
from tinymoe.nn.expert_parallel import ExpertParallelMoE


def slowest_rank_median(comm, call, repeats):
    call()  # warm-up: first-touch allocations, connection set-up
    times = []
    for _ in range(repeats):
        comm.barrier()
        start = time.perf_counter()
        call()
        elapsed = np.array([time.perf_counter() - start])
        times.append(float(comm.allgather_rows(elapsed).max()))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048, help="rows each rank sends in total")
    parser.add_argument("--width", type=int, default=256, help="features per row (float32)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--experts-per-rank", type=int, default=2, help="E = this times the number of ranks")
    parser.add_argument("--d-ff", type=int, default=512, help="hidden width of each expert")
    args = parser.parse_args()
    comm = world()
    with abort_on_error(comm):
        rows = np.random.default_rng(comm.rank).standard_normal((args.rows, args.width)).astype(np.float32)
        counts = np.full(comm.size, args.rows // comm.size, dtype=np.int64)
        counts[: args.rows % comm.size] += 1
        received = comm.alltoall_counts(counts)
        fast = MPICommunicator(comm.comm, deterministic=False) if isinstance(comm, MPICommunicator) else comm
        table = {
            "alltoallv_rows": lambda: comm.alltoallv_rows(rows, counts, received),
            "allreduce_sum rank order": lambda: comm.allreduce_sum(rows),
            "allreduce_sum MPI": lambda: fast.allreduce_sum(rows),
        }
        for name, call in table.items():
            seconds = slowest_rank_median(comm, call, args.repeats)
            if comm.rank == 0:
                megabytes = rows.nbytes / 1e6
                print(json.dumps({"row": name, "ranks": comm.size, "rows": args.rows, "width": args.width,
                                  "median_s": round(seconds, 6), "MB_per_rank": round(megabytes, 3)}))
        bench_layer(comm, args, rows)


def bench_layer(comm, args, rows):
    """Forward + backward of the expert-parallel layer; also the slowest rank's seconds in its all-to-alls."""
    layer = ExpertParallelMoE(d_model=args.width, d_ff=args.d_ff, n_experts=args.experts_per_rank * comm.size,
                              top_k=2, comm=comm, generator=0)
    tokens = tm.tensor(rows, requires_grad=True)
    exchange_seconds = []

    def step():
        layer.reset_exchange_stats()
        out = layer(tokens)
        (out.sum() + 0.01 * layer.aux_loss).backward()
        exchange_seconds.append(float(comm.allgather_rows(np.array([layer.exchange_stats.seconds])).max()))

    seconds = slowest_rank_median(comm, step, args.repeats)
    if comm.rank == 0:
        print(json.dumps({"row": "expert-parallel MoE forward+backward", "ranks": comm.size, "tokens_per_rank":
                          args.rows, "d_model": args.width, "d_ff": args.d_ff, "experts": layer.n_experts,
                          "median_s": round(seconds, 6),
                          "all_to_all_median_s": round(statistics.median(exchange_seconds[1:]), 6),
                          "rows_received_rank0": layer.exchange_stats.rows_received}))


if __name__ == "__main__":
    main()
