"""Prototype: a whole cpu-small tinymoe MoE step, kernels on Numba's OpenMP threads against kernels on the
shared pool (tinymoe.kernels.cpu_threads), and the router's small products on one BLAS thread or not,
interleaved in ONE process (A B C A B C ...), min / median ms. Relative decisions only; the figures of
record come from perf/bench_moe.py (own processes, torch peers).

    python perf/prototype_moe_threads.py [--rounds 8] [--shape cpu-small] [--variants omp,pool,pool+router]

    omp          each kernel call is one Numba parallel region (OpenMP threads, libgomp's default wait
                 policy); router: x Wᵀ and gᵀx on all BLAS threads, g W by einsum (before 2026-12-02)
    pool         kernels over the shared pool, one Numba thread each; router as in omp
    pool+router  the library of 2026-12-01 morning: the pool, and the router's products on one BLAS thread

Since then the kernels are plain `nogil` loops (no `parallel=True`), so "omp" runs each kernel as one
serial call on the calling thread: the comparison of record for the OpenMP threads is the history above.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_rows  # noqa: E402
from bench_common import SHAPES  # noqa: E402

numba_cpu = importlib.import_module("tinymoe.kernels.numba_cpu")
numba_swiglu = importlib.import_module("tinymoe.kernels.numba_swiglu")
linear = importlib.import_module("tinymoe.functional.linear")
POOL_ROWS, SMALL_PRODUCT, ROWS_TIMES_WEIGHT = numba_cpu.for_rows, linear._small_product, linear._rows_times_weight


def openmp_rows(n_rows, kernel_call, elements):
    kernel_call(0, n_rows)  # one parallel region on the calling thread, Numba's own threads


def configure(name):
    rows = openmp_rows if name == "omp" else POOL_ROWS
    numba_cpu.for_rows = numba_swiglu.for_rows = rows
    old_router = name in ("omp", "pool")
    linear._small_product = (lambda product, weight, rows_: product()) if old_router else SMALL_PRODUCT
    linear._rows_times_weight = ((lambda g, w: np.einsum("no,oi->ni", g, w) if w.shape[0] <= 16 else g @ w)
                                 if old_router else ROWS_TIMES_WEIGHT)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--variants", default="omp,pool,pool+router")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    step, _, _ = moe_rows.tinymoe_row(moe_rows.make_problem(shape), shape, "cpu")
    names = args.variants.split(",")
    results = {}
    for name in names:
        configure(name)
        step()
        out = step()
        results[name] = [out.numpy().copy()] + [p.grad.copy() for _, p in step.layer.named_parameters()]
    for name in names[1:]:
        same = [np.array_equal(a, b) for a, b in zip(results[name], results[names[0]])]
        print(f"{name}: bitwise equal to {names[0]} (output, then each parameter's gradient): {same}")
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            configure(name)
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            times[name].append((time.perf_counter() - started) * 1e3)
            cpu[name].append((time.process_time() - cpu_started) * 1e3)
    print(f"{'variant':14s} {'min ms':>8s} {'median ms':>10s} {'median CPU ms':>14s}")
    for name in names:
        print(f"{name:14s} {min(times[name]):8.1f} {np.median(times[name]):10.1f} {np.median(cpu[name]):14.1f}")


if __name__ == "__main__":
    main()
