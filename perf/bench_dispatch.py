"""GB/s of the dispatch primitives, per kernel implementation, against this machine's copy bandwidth.

    python perf/bench_dispatch.py                      # CPU, cpu-small: T=4096, d=512, E=8, K=2, float32
    python perf/bench_dispatch.py --device cuda --tokens 16384 --d-model 1024

Each primitive runs on the arrays a dropless MoE layer hands it: the routing plan of random top-k choices,
x (T, d), the expert-sorted buffer (T·K, d). Bytes counted = minimum traffic: every input read once, every
output written once (indices included), so GB/s = bytes / median time. The copy baseline is measured in
the same run, on a buffer as large as the dispatched one, counting bytes read + written: a NumPy copy on
the CPU, a device-to-device copy on the GPU. Rounds are interleaved (the copy, then every primitive of one
implementation, repeated) so a slow spell of a shared machine hits all of them alike, and before every
timed call a read of a buffer twice the last-level cache evicts the previous call's data and dirty lines,
so no call pays for its predecessor's write-backs or profits from its cached inputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinymoe.kernels import available, implementation  # noqa: E402
from tinymoe.kernels import reference  # noqa: E402


def make_problem(xp, n_tokens, d_model, n_experts, top_k, dtype, seed=0):
    """Arrays of one dropless MoE layer's dispatch: x, the plan, y, weights, a cotangent."""
    rng = np.random.default_rng(seed)
    expert_ids = np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :top_k]  # top_k distinct experts
    plan = reference.routing_plan(xp.asarray(expert_ids), n_experts)
    n_rows = plan.n_rows
    owner = plan.row_assignment
    return {
        "expert_ids": xp.asarray(expert_ids),
        "x": xp.asarray(rng.standard_normal((n_tokens, d_model)).astype(dtype)),
        "y": xp.asarray(rng.standard_normal((n_rows, d_model)).astype(dtype)),
        "grad_out": xp.asarray(rng.standard_normal((n_tokens, d_model)).astype(dtype)),
        "grad_rows": xp.asarray(rng.standard_normal((n_rows, d_model)).astype(dtype)),
        "weights": xp.asarray(rng.random((n_tokens, top_k)).astype(dtype)),
        "plan": plan,
        "owner_token": owner // top_k,
        "owner_weight": xp.asarray(rng.random(n_rows).astype(dtype)),
    }


def cases(kernels, p):
    """(primitive, call, bytes of minimum traffic) for each primitive, on implementation `kernels`."""
    plan, x, y = p["plan"], p["x"], p["y"]
    nbytes = lambda *arrays: sum(int(a.nbytes) for a in arrays)  # noqa: E731
    n_rows, d_model = y.shape
    row_bytes = n_rows * d_model * y.itemsize
    token_bytes = x.nbytes
    return [
        ("gather_rows", lambda: kernels.gather_rows(x, plan.row_token),
         token_bytes + nbytes(plan.row_token) + row_bytes),
        ("combine_rows", lambda: kernels.combine_rows(y, plan.assignment_row, p["weights"]),
         row_bytes + nbytes(plan.assignment_row, p["weights"]) + token_bytes),
        ("combine_weights_grad", lambda: kernels.combine_weights_grad(p["grad_out"], y, plan.assignment_row),
         nbytes(p["grad_out"], y, plan.assignment_row) + nbytes(p["weights"])),  # dw is shaped like the weights
        ("combine_rows dy (scaled gather)",
         lambda: kernels.gather_rows(p["grad_out"], p["owner_token"], p["owner_weight"]),
         token_bytes + nbytes(p["owner_token"], p["owner_weight"]) + row_bytes),
        ("gather_rows dx (inverse gather)", lambda: kernels.combine_rows(p["grad_rows"], plan.assignment_row, None),
         row_bytes + nbytes(plan.assignment_row) + token_bytes),
        ("scatter_add_rows", lambda: kernels.scatter_add_rows(p["grad_rows"], plan.row_token, x.shape[0]),
         row_bytes + nbytes(plan.row_token) + token_bytes),
    ]


class HostTimer:
    """Milliseconds of wall time of fn, after evicting the caches (64 MiB read: twice this machine's L3)."""

    def __init__(self, flush_bytes=64 * 2**20):
        self.flush_buffer = np.ones(flush_bytes // 8)

    def __call__(self, fn) -> float:
        self.flush_buffer.max()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class DeviceTimer:
    """Milliseconds between two CUDA events around fn (the GPU's time, not the launch's), after evicting L2."""

    def __init__(self, cupy, flush_bytes=256 * 2**20):
        self.cupy = cupy
        self.start, self.stop = cupy.cuda.Event(), cupy.cuda.Event()
        self.flush_buffer = cupy.ones(flush_bytes // 8)

    def __call__(self, fn) -> float:
        self.flush_buffer.max()
        self.start.record()
        fn()
        self.stop.record()
        self.stop.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.start, self.stop)


def print_rate_table(rows, times, copy_rate) -> None:
    """A Markdown table: per (primitive, implementation, call, bytes moved) row, the median ms of its `times`,
    GB/s and the fraction of `copy_rate` (GB/s)."""
    print(f"| {'primitive':<32} | {'implementation':<14} | {'ms':>8} | {'GB/s':>7} | {'of copy':>7} |")
    print(f"| {'-' * 32} | {'-' * 14} | {'-' * 8} | {'-' * 7} | {'-' * 7} |")
    for (primitive, name, _, nbytes), samples in sorted(zip(rows, times), key=lambda item: item[0][0]):
        ms = statistics.median(samples)
        rate = nbytes / ms / 1e6
        print(f"| {primitive:<32} | {name:<14} | {ms:8.3f} | {rate:7.1f} | {rate / copy_rate:6.0%} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    if args.device == "cuda":
        from tinymoe.engine.backend import import_cupy

        xp = import_cupy()
        timer = DeviceTimer(xp)
    else:
        xp, timer = np, HostTimer()
    p = make_problem(xp, args.tokens, args.d_model, args.experts, args.top_k, np.dtype(args.dtype))
    names = available(args.device)
    rows = [(primitive, name, call, nbytes)
            for name in names for primitive, call, nbytes in cases(implementation(p["x"], name), p)]

    copy_source = xp.asarray(p["y"])
    copy_target = xp.empty_like(copy_source)
    copy_bytes = 2 * copy_source.nbytes
    copy_call = lambda: xp.copyto(copy_target, copy_source)  # noqa: E731

    copy_times, times = [], [[] for _ in rows]
    for name in names:  # one implementation at a time: a Numba call never follows a long NumPy one
        mine = [position for position, row in enumerate(rows) if row[1] == name]
        for round_number in range(args.warmup + args.repeats):
            copy_ms = timer(copy_call)
            samples = [(position, timer(rows[position][2])) for position in mine]
            if round_number >= args.warmup:
                copy_times.append(copy_ms)
                for position, ms in samples:
                    times[position].append(ms)

    copy_ms = statistics.median(copy_times)
    copy_rate = copy_bytes / copy_ms / 1e6
    print(f"device={args.device} T={args.tokens} d={args.d_model} E={args.experts} K={args.top_k} {args.dtype}, "
          f"median of {args.repeats} after {args.warmup} warm-up rounds")
    print(f"copy of {copy_source.nbytes / 2**20:.1f} MiB: {copy_ms:.3f} ms, {copy_rate:.1f} GB/s (read + write)\n")
    print_rate_table(rows, times, copy_rate)


if __name__ == "__main__":
    main()
