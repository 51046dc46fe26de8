"""Check and time every CuPy kernel (tinymoe.kernels.cuda) on a GPU, against the xp reference.

    python perf/gpu_check.py                 # correctness in float32/float64/float16, then timings (float32)
    python perf/gpu_check.py --skip-timing   # correctness only
    python perf/gpu_check.py --shapes all --timing-dtype float16

Correctness: fresh random inputs for each case (odd widths and misaligned rows take the one-element path,
16-byte-aligned rows the vector path; capacity drops, capacity 0, empty experts, every token on one expert,
K = E, T = 1, valid masks). Each kernel's output memory is poisoned first (NaN bytes handed back to CuPy's
pool), and results are compared with the NumPy reference computed in float64 on the same inputs. Every
kernel also runs twice and must give the same bits.

Timing: CUDA events around each call, median of --repeats after warm-up, GB/s of the minimum traffic (each
input read once, each output written once) against a device-to-device copy measured in the same run.
Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from bench_dispatch import DeviceTimer, cases, make_problem, print_rate_table  # perf/ is this script's folder

import tinymoe_api as api

reference = api.reference_kernels

TOLERANCE = {"float64": 1e-11, "float32": 2e-5, "float16": 1.5e-2}  # relative to the output's scale
SHAPES = {"cpu-small": (4096, 512, 8, 2, 1024), "mixtral-like": (16384, 1024, 8, 2, 2816),
          "fine-grained": (16384, 1024, 64, 6, 512)}  # T, d, E, K, ff
# (T, d, E, K, capacity, layout, misaligned)
CASES = [
    (1, 1, 1, 1, None, "uniform", False),
    (1, 8, 4, 2, None, "uniform", False),
    (7, 3, 4, 2, 2, "uniform", False),
    (33, 64, 8, 2, None, "uniform", False),
    (33, 64, 8, 2, None, "uniform", True),
    (50, 40, 8, 8, None, "uniform", False),
    (64, 16, 4, 2, None, "one expert", False),
    (64, 24, 8, 2, 5, "some experts empty", False),
    (40, 32, 4, 2, 0, "uniform", False),
    (300, 136, 16, 3, 40, "valid mask", False),
    (1000, 1000, 8, 2, None, "uniform", False),
    (257, 1024, 64, 6, 30, "uniform", True),
]


class Checker:
    def __init__(self, cupy):
        self.cupy, self.failures, self.count = cupy, [], 0

    def poison(self, nbytes: int):
        """Fill a block of `nbytes` with 0xFF (NaN in every float dtype) and give it back to CuPy's pool, so
        the next allocation of that size starts as NaN: an output element the kernel forgets shows up."""
        if nbytes:
            self.cupy.full(nbytes, 0xFF, dtype=self.cupy.uint8)
            self.cupy.cuda.Device().synchronize()

    def run(self, call, nbytes):
        self.poison(nbytes)
        first = call()
        self.poison(nbytes)
        second = call()
        return first, second

    def compare(self, label, dtype, got, want, exact=False):
        self.count += 1
        got_host = [self.cupy.asnumpy(g) for g in (got if isinstance(got, tuple) else (got,))]
        want_host = [np.asarray(w) for w in (want if isinstance(want, tuple) else (want,))]
        for position, (g, w) in enumerate(zip(got_host, want_host)):
            problem = None
            if g.dtype != np.dtype(dtype) or g.shape != w.shape:
                problem = f"returned {g.dtype} {g.shape}, expected {np.dtype(dtype)} {w.shape}"
            elif exact and not np.array_equal(g, w):
                problem = f"differs from the reference in {int((g != w).sum())} places"
            elif not exact:
                g64, w64 = g.astype(np.float64), w.astype(np.float64)
                scale = max(1.0, float(np.abs(w64).max())) if w64.size else 1.0
                error = float(np.abs(g64 - w64).max()) if w64.size else 0.0
                if not np.isfinite(g64).all() or error > TOLERANCE[np.dtype(dtype).name] * scale:
                    problem = f"max error {error:.3g} (scale {scale:.3g}); non-finite: {int((~np.isfinite(g64)).sum())}"
            if problem:
                self.failures.append(f"{label} [output {position}]: {problem}")

    def same_bits(self, label, first, second):
        pairs = zip(first if isinstance(first, tuple) else (first,), second if isinstance(second, tuple) else (second,))
        for a, b in pairs:
            if bool(self.cupy.isnan(a).any()) or bool(self.cupy.isnan(b).any()):
                self.failures.append(f"{label}: NaN in the output (an element left unwritten?)")
            elif not bool(self.cupy.array_equal(a, b)):
                self.failures.append(f"{label}: two runs differ")


def expert_choices(rng, n_tokens, n_experts, top_k, layout):
    if layout == "one expert":
        return np.zeros((n_tokens, top_k), dtype=np.int64)
    if layout == "some experts empty":
        pool = rng.choice(n_experts, max(top_k, n_experts // 2), replace=False)
        return np.stack([rng.choice(pool, top_k, replace=False) for _ in range(n_tokens)])
    return np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :top_k]


def device_array(cupy, host, misaligned):
    """`host` on the GPU; misaligned: contiguous, but starting one element past a 16-byte boundary."""
    if not misaligned:
        return cupy.asarray(host)
    buffer = cupy.empty(host.size + 1, dtype=host.dtype)
    view = buffer[1:].reshape(host.shape)
    view[...] = cupy.asarray(host)
    return view


def check_case(checker, dtype, case, seed):
    cupy, cuda = checker.cupy, api.cuda_kernels()
    n_tokens, d_model, n_experts, top_k, capacity, layout, misaligned = case
    rng = np.random.default_rng(seed)
    label = f"{np.dtype(dtype).name} T={n_tokens} d={d_model} E={n_experts} K={top_k} cap={capacity} {layout}" + (
        " misaligned" if misaligned else "")
    expert_ids = expert_choices(rng, n_tokens, n_experts, top_k, layout)
    valid = rng.random(expert_ids.shape) < 0.7 if layout == "valid mask" else None
    plan_host = api.routing_plan(expert_ids, n_experts, capacity, valid)
    valid_d = None if valid is None else cupy.asarray(valid)
    plan = cuda.routing_plan(cupy.asarray(expert_ids), n_experts, capacity, valid_d)
    for field in api.PLAN_INDEX_FIELDS:
        checker.compare(f"routing_plan.{field} {label}", np.int64, getattr(plan, field), getattr(plan_host, field),
                        exact=True)

    def data(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, y, grad_out = data(n_tokens, d_model), data(plan_host.n_rows, d_model), data(n_tokens, d_model)
    scale, weights = rng.random(plan_host.n_rows).astype(dtype), rng.random((n_tokens, top_k)).astype(dtype)
    a, b, grad_h = 6 * data(n_tokens, d_model), data(n_tokens, d_model), data(n_tokens, d_model)
    on_gpu = {name: device_array(cupy, value, misaligned) for name, value in
              dict(x=x, y=y, grad_out=grad_out, a=a, b=b, grad_h=grad_h).items()}
    scale_d, weights_d = cupy.asarray(scale), cupy.asarray(weights)
    row_token, assignment_row = cupy.asarray(plan_host.row_token), cupy.asarray(plan_host.assignment_row)
    wide = lambda array: array.astype(np.float64)  # noqa: E731
    itemsize = np.dtype(dtype).itemsize
    checks = [
        ("gather_rows", lambda: cuda.gather_rows(on_gpu["x"], row_token), plan_host.n_rows * d_model,
         reference.gather_rows(wide(x), plan_host.row_token)),
        ("gather_rows scaled", lambda: cuda.gather_rows(on_gpu["x"], row_token, scale_d), plan_host.n_rows * d_model,
         reference.gather_rows(wide(x), plan_host.row_token, wide(scale))),
        ("combine_rows", lambda: cuda.combine_rows(on_gpu["y"], assignment_row, weights_d), n_tokens * d_model,
         reference.combine_rows(wide(y), plan_host.assignment_row, wide(weights))),
        ("combine_rows unweighted", lambda: cuda.combine_rows(on_gpu["y"], assignment_row), n_tokens * d_model,
         reference.combine_rows(wide(y), plan_host.assignment_row)),
        ("combine_weights_grad", lambda: cuda.combine_weights_grad(on_gpu["grad_out"], on_gpu["y"], assignment_row),
         n_tokens * top_k, reference.combine_weights_grad(wide(grad_out), wide(y), plan_host.assignment_row)),
        ("scatter_add_rows", lambda: cuda.scatter_add_rows(on_gpu["y"], row_token, n_tokens), n_tokens * d_model,
         reference.scatter_add_rows(wide(y), plan_host.row_token, n_tokens)),
        ("swiglu", lambda: cuda.swiglu(on_gpu["a"], on_gpu["b"]), n_tokens * d_model,
         reference.swiglu(wide(a), wide(b))),
        ("swiglu_backward", lambda: cuda.swiglu_backward(on_gpu["a"], on_gpu["b"], on_gpu["grad_h"]),
         n_tokens * d_model, reference.swiglu_backward(wide(a), wide(b), wide(grad_h))),
    ]
    for name, call, n_out, expected in checks:
        first, second = checker.run(call, n_out * itemsize)
        checker.compare(f"{name} {label}", dtype, first, expected, exact=name == "gather_rows")
        checker.same_bits(f"{name} {label}", first, second)


def time_shape(cupy, shape_name, dtype, repeats, warmup):
    n_tokens, d_model, n_experts, top_k, ff = SHAPES[shape_name]
    timer, cuda = DeviceTimer(cupy), api.cuda_kernels()
    p = make_problem(cupy, n_tokens, d_model, n_experts, top_k, np.dtype(dtype))
    rng = np.random.default_rng(1)
    n_rows = p["plan"].n_rows
    a, b, grad_h = (cupy.asarray(rng.standard_normal((n_rows, ff)).astype(dtype)) for _ in range(3))
    hidden_bytes = a.nbytes
    rows = []
    for name, module in (("numpy (xp)", reference), ("cupy", cuda)):
        for primitive, call, nbytes in cases(module, p):
            rows.append((primitive, name, call, nbytes))
        rows.append(("swiglu", name, lambda m=module: m.swiglu(a, b), 3 * hidden_bytes))
        rows.append(("swiglu_backward", name, lambda m=module: m.swiglu_backward(a, b, grad_h), 6 * hidden_bytes))
        rows.append(("routing_plan", name, lambda m=module: m.routing_plan(p["expert_ids"], n_experts),
                     p["expert_ids"].nbytes + 3 * 8 * n_rows))  # row_token, row_assignment, assignment_row
    source = cupy.asarray(p["y"])
    target = cupy.empty_like(source)
    copy_times = []
    times = [[] for _ in rows]
    for round_number in range(warmup + repeats):
        copy_ms = timer(lambda: cupy.copyto(target, source))
        samples = [timer(call) for _, _, call, _ in rows]
        if round_number >= warmup:
            copy_times.append(copy_ms)
            for position, ms in enumerate(samples):
                times[position].append(ms)
    copy_ms = statistics.median(copy_times)
    copy_rate = 2 * source.nbytes / copy_ms / 1e6
    print(f"\n{shape_name} (T={n_tokens} d={d_model} E={n_experts} K={top_k} ff={ff}) {np.dtype(dtype).name}: "
          f"device copy of {source.nbytes / 2**20:.0f} MiB {copy_ms:.3f} ms = {copy_rate:.0f} GB/s (read + write)")
    print_rate_table(rows, times, copy_rate)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="cpu-small,mixtral-like,fine-grained", help="comma list, or 'all'")
    parser.add_argument("--timing-dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    cupy = api.import_cupy()
    print("NOTE: this script has not been run on a GPU since its last edit (none was available)")
    print(f"CuPy {cupy.__version__}, device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")

    checker = Checker(cupy)
    for dtype in ("float32", "float64", "float16"):
        for seed, case in enumerate(CASES):
            try:
                check_case(checker, dtype, case, seed)
            except Exception as error:  # a launch or compile error: report it with its case, keep going
                checker.failures.append(f"{np.dtype(dtype).name} {case}: {type(error).__name__}: {error}")
    print(f"correctness: {checker.count} comparisons with the reference, {len(checker.failures)} failures")
    for failure in checker.failures:
        print("  FAIL", failure)

    if not args.skip_timing:
        shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
        for shape_name in shapes:
            time_shape(cupy, shape_name, args.timing_dtype, args.repeats, args.warmup)
    return 1 if checker.failures else 0


if __name__ == "__main__":
    sys.exit(main())
