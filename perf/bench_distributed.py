"""Skeleton: time the collectives of tinymoe.distributed over MPI (run it under mpiexec).

    mpiexec -n 2 python perf/bench_distributed.py                  # alltoallv_rows and allreduce_sum
    mpiexec -n 4 python perf/bench_distributed.py --rows 4096 --width 512 --repeats 20

Each rank sends an even share of `--rows` float32 rows of `--width` to every rank (the expert-parallel
exchange with perfectly balanced routing) and all-reduces a `--rows` x `--width` float32 array, in rank order
(deterministic=True, the default) and with MPI_Allreduce (deterministic=False). Rank 0 prints one JSON line
per row: the median over --repeats of the slowest rank's time (a collective is as slow as its slowest rank).
Not yet: uneven routing, CuPy buffers (host staging vs CUDA-aware), the full expert-parallel MoE layer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from tinymoe.distributed import MPICommunicator, abort_on_error, world


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


if __name__ == "__main__":
    main()
