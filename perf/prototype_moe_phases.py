"""Prototype: where one cpu-small tinymoe MoE step spends its time, in ONE process.

Wraps the forward and backward of every tinymoe Function (and a few helpers) with timers, runs N steps,
prints per-phase min/median ms and what is left for the Python glue. Timers nest (a Function called inside
another's forward is counted in both); the table says which phases are leaves.

    python perf/prototype_moe_phases.py [--steps 10] [--shape cpu-small] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import functools
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_rows  # noqa: E402
from bench_common import SHAPES  # noqa: E402

TIMES = collections.defaultdict(list)
CURRENT = collections.defaultdict(float)


def timed(name, function):
    @functools.wraps(function)  # keeps the signature: experts.py reads which keywords a kernel takes
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            CURRENT[name] += time.perf_counter() - start
    return wrapper


def instrument():
    import tinymoe.engine.function as function_module
    import tinymoe.nn.moe as moe
    import tinymoe.kernels.numba_cpu as numba_cpu
    import tinymoe.kernels.numba_swiglu as numba_swiglu

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    for cls in set(subclasses(function_module.Function)):
        for method in ("forward", "backward"):
            if method in cls.__dict__:
                setattr(cls, method, staticmethod(timed(f"{cls.__name__}.{method}", cls.__dict__[method].__func__)))
    moe.check_finite = timed("check_finite(moe)", moe.check_finite)
    moe.routing_plan_unchecked = timed("routing_plan", moe.routing_plan_unchecked)
    moe.MoEStats = timed("MoEStats()", moe.MoEStats)
    for name in ("swiglu", "swiglu_backward"):
        setattr(numba_cpu, name, timed(f"numba.{name}", getattr(numba_cpu, name)))
    for name in ("gather_rows", "combine_rows", "combine_weights_grad"):
        setattr(numba_cpu, name, timed(f"numba.{name}", getattr(numba_cpu, name)))
    import tinymoe.kernels.cpu_threads as cpu_threads
    cpu_threads.enter_one_thread_blas = timed("blas limit enter", cpu_threads.enter_one_thread_blas)
    cpu_threads.leave_one_thread_blas = timed("blas limit leave", cpu_threads.leave_one_thread_blas)
    for name in ("_swiglu", "_swiglu_backward", "_swiglu_backward_in_place"):
        setattr(numba_swiglu, name, timed(f"numba.{name} (kernel, per range)", getattr(numba_swiglu, name)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    step, _, _ = moe_rows.tinymoe_row(moe_rows.make_problem(shape), shape, "cpu")
    step(); step()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    instrument()
    step()
    totals = []
    for _ in range(args.steps):
        CURRENT.clear()
        start = time.perf_counter()
        step()
        totals.append((time.perf_counter() - start) * 1e3)
        for name, value in CURRENT.items():
            TIMES[name].append(value * 1e3)
    print(f"{'phase':40s} {'min ms':>8s} {'median':>8s}")
    print(f"{'STEP':40s} {min(totals):8.1f} {np.median(totals):8.1f}")
    for name, values in sorted(TIMES.items(), key=lambda item: -np.median(item[1])):
        print(f"{name:40s} {min(values):8.2f} {np.median(values):8.2f}")


if __name__ == "__main__":
    main()
