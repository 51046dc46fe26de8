"""GB/s of the dispatch primitives, per kernel implementation, as a fraction of an out-of-cache copy.

    python perf/bench_dispatch.py                                  # CPU: T=98304, d=1024, E=8, K=2, float32
    python perf/bench_dispatch.py --tokens 512 --d-model 64 --repeats 2 --flush-mib 8   # smoke test only
    python perf/bench_dispatch.py --device cuda --tokens 16384     # UNTESTED here (no GPU when written)

Each primitive runs on the arrays a dropless MoE layer hands it: the routing plan of random top-k choices,
x (T, d), the expert-sorted buffer (T·K, d), and allocates its output itself, as in the layer. Bytes
counted = minimum traffic: every input read once, every output written once (indices included); GB/s =
bytes / time. At the default size every call moves >= 1 GiB, more than twice the last-level cache.

The limit: a copy of the expert-sorted buffer (the largest operand; T·K·d elements read + written, >= 1 GiB
per call) into a buffer allocated once and reused, as the primitives' outputs are (their large outputs come
from tinymoe.engine.workspace, whose blocks are reused once freed: no page faults after the first call; it
keeps freed blocks up to a quarter of the machine's memory); a copy into a fresh np.empty each call (page
faults included) is printed beside it for reference. The copy is timed in the same process, in every round,
interleaved with the primitives; "of copy" is taken round by round (primitive GB/s / copy GB/s of the same
round), then the median and min–max. Before every timed call a read of a buffer twice the
last-level cache evicts the previous call's data and dirty lines.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench_common import last_level_cache_bytes, machine_lines, status_kib, summarize_threadpools, threadpool_info

import tinymoe_api as api


def make_problem(xp, n_tokens, d_model, n_experts, top_k, dtype, seed=0):
    """Arrays of one dropless MoE layer's dispatch: x, the plan, y, weights, a cotangent."""
    rng = np.random.default_rng(seed)
    expert_ids = np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :top_k]  # top_k distinct experts
    plan = api.routing_plan(xp.asarray(expert_ids), n_experts)
    n_rows = plan.n_rows

    def normal(*shape):
        array = rng.standard_normal(shape, dtype=np.float32)
        return xp.asarray(array if np.dtype(dtype) == np.float32 else array.astype(dtype))

    return {
        "expert_ids": xp.asarray(expert_ids),
        "x": normal(n_tokens, d_model),
        "y": normal(n_rows, d_model),
        "grad_out": normal(n_tokens, d_model),
        "grad_rows": normal(n_rows, d_model),
        "weights": xp.asarray(rng.random((n_tokens, top_k)).astype(dtype)),
        "plan": plan,
        "owner_token": plan.row_assignment // top_k,
        "owner_weight": xp.asarray(rng.random(n_rows).astype(dtype)),
    }


def cases(kernels, p):
    """(primitive, call, bytes of minimum traffic) for each primitive, on implementation module `kernels`."""
    plan, x, y = p["plan"], p["x"], p["y"]
    nbytes = lambda *arrays: sum(int(a.nbytes) for a in arrays)  # noqa: E731
    n_rows, d_model = y.shape
    row_bytes = n_rows * d_model * y.itemsize
    token_bytes = x.nbytes
    return [
        ("gather_rows", lambda: kernels.gather_rows(x, plan.row_token),
         token_bytes + nbytes(plan.row_token) + row_bytes),
        ("gather_rows backward (inverse gather)", lambda: kernels.combine_rows(p["grad_rows"], plan.assignment_row, None),
         row_bytes + nbytes(plan.assignment_row) + token_bytes),
        ("combine_rows", lambda: kernels.combine_rows(y, plan.assignment_row, p["weights"]),
         row_bytes + nbytes(plan.assignment_row, p["weights"]) + token_bytes),
        ("combine_rows backward dy (scaled gather)",
         lambda: kernels.gather_rows(p["grad_out"], p["owner_token"], p["owner_weight"]),
         token_bytes + nbytes(p["owner_token"], p["owner_weight"]) + row_bytes),
        ("combine_rows backward dw", lambda: kernels.combine_weights_grad(p["grad_out"], y, plan.assignment_row),
         nbytes(p["grad_out"], y, plan.assignment_row) + nbytes(p["weights"])),  # dw is shaped like the weights
        ("scatter_add_rows (no-inverse backward)",
         lambda: kernels.scatter_add_rows(p["grad_rows"], plan.row_token, x.shape[0]),
         row_bytes + nbytes(plan.row_token) + token_bytes),
    ]


class HostTimer:
    """Milliseconds of wall time of fn, after evicting the caches (a read of `flush_bytes`)."""

    def __init__(self, flush_bytes):
        self.flush_buffer = np.ones(max(flush_bytes, 8) // 8)

    def __call__(self, fn) -> float:
        self.flush_buffer.max()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class DeviceTimer:  # UNTESTED in this version: no GPU was available when it was written
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


def print_rate_table(rows, times, copy_rate, copy_rates_per_round=None) -> None:
    """A Markdown table: per (primitive, implementation, call, bytes) row, the median ms of its `times`, GB/s
    and the fraction of the copy: round by round against `copy_rates_per_round` (median, min–max) when given,
    else against the single figure `copy_rate` (GB/s)."""
    print(f"| {'primitive':<40} | {'implementation':<14} | {'MiB moved':>9} | {'ms':>8} | {'GB/s':>6} | "
          f"{'of copy: median (min–max)':>26} |")
    print(f"| {'-' * 40} | {'-' * 14} | {'-' * 9} | {'-' * 8} | {'-' * 6} | {'-' * 26} |")
    order = {}
    for primitive, *_ in rows:
        order.setdefault(primitive, len(order))  # primitives in the order given, implementations side by side
    for (primitive, name, _, nbytes), samples in sorted(zip(rows, times), key=lambda item: order[item[0][0]]):
        ms = statistics.median(samples)
        rate = nbytes / ms / 1e6
        if copy_rates_per_round:
            fractions = [100 * nbytes / sample / 1e6 / copy for sample, copy in zip(samples, copy_rates_per_round)]
            of_copy = f"{statistics.median(fractions):.0f}% ({min(fractions):.0f}–{max(fractions):.0f}%)"
        else:
            of_copy = f"{rate / copy_rate:.0%}"
        print(f"| {primitive:<40} | {name:<14} | {nbytes / 2**20:9.0f} | {ms:8.2f} | {rate:6.1f} | {of_copy:>26} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=98304)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flush-mib", type=int, default=None,
                        help="bytes read before each timed CPU call (default: twice the last-level cache)")
    args = parser.parse_args(argv)
    for line in machine_lines(args.device):
        print(line)

    if args.device == "cuda":
        print("NOTE: the --device cuda path has not been run on a GPU yet (none was available when it was written)")
        xp = api.import_cupy()
        timer = DeviceTimer(xp)
    else:
        flush = 2 * last_level_cache_bytes() if args.flush_mib is None else args.flush_mib * 2**20
        xp, timer = np, HostTimer(flush)
        print(f"cache eviction before each call: a read of {flush / 2**20:.0f} MiB")
    p = make_problem(xp, args.tokens, args.d_model, args.experts, args.top_k, np.dtype(args.dtype))
    names = api.available_kernels(args.device)
    rows = [(primitive, name, call, nbytes)
            for name in names for primitive, call, nbytes in cases(api.kernel_module(p["x"], name), p)]

    copy_source = p["y"]
    reused_target = xp.empty_like(copy_source)
    copy_bytes = 2 * copy_source.nbytes
    copies = {"fresh": lambda: xp.copyto(xp.empty_like(copy_source), copy_source),  # allocation included
              "reused": lambda: xp.copyto(reused_target, copy_source)}

    copy_times = {kind: [] for kind in copies}
    times = [[] for _ in rows]
    for round_number in range(args.warmup + args.repeats):
        samples = {kind: timer(call) for kind, call in copies.items()}
        row_samples = [timer(row[2]) for row in rows]
        if round_number >= args.warmup:
            for kind, ms in samples.items():
                copy_times[kind].append(ms)
            for position, ms in enumerate(row_samples):
                times[position].append(ms)

    print(f"T={args.tokens} d={args.d_model} E={args.experts} K={args.top_k} {args.dtype}, kernels {', '.join(names)}; "
          f"median of {args.repeats} rounds after {args.warmup} warm-up rounds; BLAS: "
          f"{summarize_threadpools(threadpool_info())}; {api.runtime_info()}")
    copy_rates = [copy_bytes / ms / 1e6 for ms in copy_times["reused"]]
    for kind, label in (("reused", "into a reused buffer (the limit)"), ("fresh", "into a fresh np.empty")):
        rates = [copy_bytes / ms / 1e6 for ms in copy_times[kind]]
        print(f"copy of {copy_source.nbytes / 2**20:.0f} MiB {label}: {statistics.median(copy_times[kind]):.2f} ms, "
              f"{statistics.median(rates):.1f} GB/s ({min(rates):.1f}–{max(rates):.1f}) read + write")
    print()
    print_rate_table(rows, times, statistics.median(copy_rates), copy_rates)
    print(f"\npeak resident memory of this process: {status_kib('VmHWM:') / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
