"""Prototype: a whole cpu-small MoE step (tinymoe only), today's expert/linear code against the kept changes,
interleaved in ONE process (A B C D A B C D ...), min / median ms. Relative decisions only; the figures of
record come from perf/bench_moe.py (own processes, torch peers).

    python perf/prototype_moe_step.py [--rounds 10] [--shape cpu-small]

Variants: today (9 GEMMs per expert, BLAS router dx), fused-serial (w1|w3 fused, blocks in order, einsum
router dx), fused-threads (blocks over the cores, one-thread BLAS), fused-threads-blas-router.
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
from prototype_experts import OldSwiGLUExperts  # noqa: E402

experts_module = importlib.import_module("tinymoe.functional.experts")
linear_module = importlib.import_module("tinymoe.functional.linear")
NEW, SMALL = experts_module.SwiGLUExperts, linear_module.SMALL_INNER_DIMENSION
RUN_BLOCKS = experts_module.run_blocks


def run_blocks_numba_serial(work, blocks, like, work_per_row):
    """run_blocks whose workers set one Numba thread (historical: since 2026-12-01 the kernels are serial loops
    that never start Numba's threads, so this equals plain run_blocks)."""
    import numba

    def serial_kernels(block):
        numba.set_num_threads(1)
        return work(block)
    return RUN_BLOCKS(serial_kernels, blocks, like, work_per_row)


def configure(name):
    experts_module.SwiGLUExperts = OldSwiGLUExperts if name == "today" else NEW
    experts_module.run_blocks = run_blocks_numba_serial if name == "fused-threads-numba1" else RUN_BLOCKS
    linear_module.SMALL_INNER_DIMENSION = 0 if name in ("today", "fused-threads-blas-router",
                                                        "fused-serial-blas-router") else SMALL
    experts_module._blas_controller()
    controller = experts_module._pool.get("saved_controller") or experts_module._pool["controller"]
    experts_module._pool["saved_controller"] = controller
    experts_module._pool["controller"] = False if name in ("today", "fused-serial",
                                                           "fused-serial-blas-router") else controller


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--variants", default="today,fused-serial,fused-threads,fused-threads-blas-router,fused-threads-numba1")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    step, _, _ = moe_rows.tinymoe_row(moe_rows.make_problem(shape), shape, "cpu")
    names = args.variants.split(",")
    grads = {}
    for name in names:
        configure(name)
        step()
        out = step()
        grads[name] = [out.numpy()] + [p.grad.copy() for _, p in step.layer.named_parameters()]
    for name in names[1:]:
        for got, want in zip(grads[name], grads[names[0]]):
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            configure(name)
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"{'variant':28s} {'min ms':>8s} {'median ms':>10s}")
    for name in names:
        print(f"{name:28s} {min(times[name]):8.1f} {np.median(times[name]):10.1f}")


if __name__ == "__main__":
    main()
