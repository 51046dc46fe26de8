"""Forward + backward of one MoE layer: tinymoe against PyTorch eager peers, each row in its own process.

    python perf/bench_moe.py                          # cpu-small, 5 alternated rounds, all rows
    python perf/bench_moe.py --memory                 # also peak memory of one step / one no_grad forward
    python perf/bench_moe.py --check                  # do the rows compute the same layer? (no timing)
    python perf/bench_moe.py --shape tiny --rounds 1  # a smoke test of this script
    python perf/bench_moe.py --device cuda            # UNTESTED (no GPU when written): the three shapes

The rule of shared/BENCHMARKS.md: every row (tinymoe; torch transformers-style; torch sort-based; the
expert matmuls alone, the floor; a square float32 matmul, the machine's rate) runs in a fresh process of
its own with its libraries' defaults, as a user would run it; the rows alternate over rounds (A B C D E,
A B C D E, ...); each worker warms up, then times --repeats calls and reports their median. Per row this
prints the median over rounds with the min–max; tinymoe / best torch and the fraction of the square
matmul's rate are taken round by round (median, min–max). FLOPs: 3 · T·k · 6·d·ff per step.

This parent process imports neither torch nor tinymoe (nor NumPy): nothing it loads can affect a row.
Workers set no environment variables; they inherit this process's environment, the same for every row.
--clean-openblas-env removes OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE from it (for all rows alike).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_common import (LAYER_ROWS, MATMUL_SIZE, OPENBLAS_TUNING_VARIABLES, ROWS, SHAPES, describe_shape, flops,
                          machine_lines, summarize_threadpools)

TORCH_ROWS = ("torch-loop", "torch-sort")
LABELS = {"tinymoe": "tinymoe", "torch-loop": "torch, transformers-style", "torch-sort": "torch, sort-based",
          "floor": "expert matmuls alone (floor)", "floor-fused": "fused floor (6 GEMMs, 1/core)",
          "matmul": "square matmul"}


# ----- worker side (a fresh process per row) ---------------------------------------------------------------
def worker(args) -> None:
    from bench_common import threadpool_info

    import moe_rows

    if args.memory_mode:
        result = moe_rows.peak_memory(args.worker, args.shape, args.device, args.memory_mode, args.tinymoe_kernels)
    else:
        result = moe_rows.time_row(args.worker, args.shape, args.device, args.warmup, args.repeats,
                                   args.tinymoe_kernels)
    result["threadpools"] = threadpool_info()
    if args.worker == "tinymoe":
        import tinymoe_api

        result["runtime"] = {**tinymoe_api.runtime_info(), "kernels": tinymoe_api.chosen_kernels(args.device)}
    elif args.worker in TORCH_ROWS:
        import torch  # already loaded by the row

        result["runtime"] = {"torch": torch.__version__, "intra-op threads": torch.get_num_threads(),
                             "mkl": torch.backends.mkl.is_available(), "onednn": torch.backends.mkldnn.is_available()}
    if args.device == "cuda":  # UNTESTED
        import tinymoe_api

        properties = tinymoe_api.import_cupy().cuda.runtime.getDeviceProperties(0)
        result["device_name"] = properties["name"].decode()
    print(json.dumps(result))


# ----- parent side -----------------------------------------------------------------------------------------
def run_worker(args, row, shape_name, environment, memory_mode=None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", row, "--shape", shape_name, "--device",
               args.device, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.tinymoe_kernels:
        command += ["--tinymoe-kernels", args.tinymoe_kernels]
    if memory_mode:
        command += ["--memory-mode", memory_mode]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"killed after --worker-timeout {args.worker_timeout:g} s"}
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or f"exit status {done.returncode}"
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values, fmt="{:.1f}", unit="") -> str:
    """'median (min–max)' of a list of numbers, then `unit`; '-' for none."""
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))}){unit}"


def measure_shape(args, shape_name, rows, environment) -> dict:
    """The alternated rounds for one shape: {row: [worker result per round]}."""
    results = {row: [] for row in rows}
    for round_number in range(1, args.rounds + 1):
        line = []
        for row in rows:
            result = run_worker(args, row, shape_name, environment)
            results[row].append(result)
            line.append(f"{row} {result['median_ms']:.1f} ms" if "median_ms" in result else f"{row} FAILED")
        print(f"  round {round_number}/{args.rounds}: " + ", ".join(line), flush=True)
    return results


def report_shape(args, shape_name, results) -> dict:
    """Print the per-row table of one shape; return the derived figures."""
    shape = SHAPES[shape_name]
    work = flops(shape)
    for row, per_round in results.items():
        for result in per_round:
            if "error" in result:
                print(f"  {row} failed in a round: {result['error']}")
    ok = lambda row, r: "median_ms" in results[row][r]  # noqa: E731
    matmul_rates = {}
    if "matmul" in results:
        size = MATMUL_SIZE[args.device]
        matmul_rates = {r: 2.0 * size**3 / (results["matmul"][r]["median_ms"] / 1e3) / 1e9
                        for r in range(args.rounds) if ok("matmul", r)}
        print(f"  square {size}² float32 matmul: {spread(list(matmul_rates.values()), '{:.0f}')} GFLOP/s")
    best_torch = {}
    for r in range(args.rounds):
        peers = [results[row][r]["median_ms"] for row in TORCH_ROWS if row in results and ok(row, r)]
        if peers:
            best_torch[r] = min(peers)
    header = f"  {'row':<30}{'ms: median (min–max)':>24}{'GFLOP/s':>9}{'of matmul':>22}{'vs best torch':>24}"
    print(header)
    derived = {}
    for row in results:
        if row == "matmul":
            continue
        rounds_ok = [r for r in range(args.rounds) if ok(row, r)]
        ms = [results[row][r]["median_ms"] for r in rounds_ok]
        of_matmul = [work / (results[row][r]["median_ms"] / 1e3) / 1e9 / matmul_rates[r]
                     for r in rounds_ok if r in matmul_rates]
        versus = [results[row][r]["median_ms"] / best_torch[r] for r in rounds_ok if r in best_torch]
        gflops = work / (statistics.median(ms) / 1e3) / 1e9 if ms else float("nan")
        print(f"  {LABELS[row]:<30}{spread(ms):>24}{gflops:9.1f}{spread([100 * v for v in of_matmul], '{:.0f}', '%'):>22}"
              f"{spread(versus, '{:.2f}', 'x'):>24}")
        derived[row] = {"ms": ms, "of_matmul": of_matmul, "vs_best_torch": versus}
    print("  (ratios and % of matmul are taken within each round, then the median and min–max over rounds)")
    for row, per_round in results.items():
        pools = {summarize_threadpools(result.get("threadpools", [])) for result in per_round if "error" not in result}
        runtime = next((result["runtime"] for result in per_round if "runtime" in result), None)
        print(f"  libraries in the {row} worker: {' / '.join(sorted(pools))}" + (f"; {runtime}" if runtime else ""))
    devices = {result["device_name"] for per_round in results.values() for result in per_round if "device_name" in result}
    if devices:
        print(f"  device: {', '.join(sorted(devices))}")
    return {"matmul_gflops": list(matmul_rates.values()), "rows": derived}


def measure_memory(args, shape_name, rows, environment) -> dict:
    memory = {}
    print(f"  peak memory (fresh process per cell; {'device allocator' if args.device == 'cuda' else 'VmHWM growth'}"
          f" during the call, above the set-up):")
    for row in [row for row in rows if row in LAYER_ROWS]:
        memory[row] = {mode: run_worker(args, row, shape_name, environment, memory_mode=mode)
                       for mode in ("step", "forward")}
        cells = [f"{memory[row][mode]['mib']:.0f} MiB" if memory[row][mode].get("mib") is not None
                 else memory[row][mode].get("error", memory[row][mode].get("method")) for mode in ("step", "forward")]
        print(f"    {LABELS[row]:<30} training step {cells[0]:>9}   no_grad forward {cells[1]:>9}")
    return memory


def worker_environment(args) -> dict:
    environment = dict(os.environ)
    present = {name: environment[name] for name in OPENBLAS_TUNING_VARIABLES if name in environment}
    if args.clean_openblas_env:
        for name in OPENBLAS_TUNING_VARIABLES:
            environment.pop(name, None)
        print(f"--clean-openblas-env: removed {present or 'nothing (none was set)'} from every worker's environment")
    elif present:
        print(f"note: every worker inherits {present} (--clean-openblas-env removes them for all rows)")
    return environment


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", default=None, help=f"comma-separated, of {', '.join(SHAPES)} "
                        "(default: cpu-small on cpu, the three BENCHMARKS shapes on cuda)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run, in this order")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (one fresh process per row each)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per worker (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per worker before timing")
    parser.add_argument("--tinymoe-kernels", default=None, help="run tinymoe with tm.kernels.use(NAME) (default: auto)")
    parser.add_argument("--memory", action="store_true", help="also peak memory per layer row (fresh processes)")
    parser.add_argument("--check", action="store_true", help="only compare outputs and gradients of the rows")
    parser.add_argument("--clean-openblas-env", action="store_true",
                        help="unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for every worker")
    parser.add_argument("--worker-timeout", type=float, default=1800, help="seconds before a worker is killed")
    parser.add_argument("--json", metavar="FILE", help="also write every worker's raw result as JSON")
    parser.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--memory-mode", choices=("step", "forward"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    names = args.shape.split(",") if args.shape else (["cpu-small"] if args.device == "cpu"
                                                      else ["cpu-small", "mixtral-like", "fine-grained"])
    rows = args.rows.split(",")
    for name in names:
        if name not in SHAPES:
            parser.error(f"--shape {name!r} is unknown; expected one of {', '.join(SHAPES)}")
    for row in rows:
        if row not in ROWS:
            parser.error(f"--rows: {row!r} is unknown; expected one of {', '.join(ROWS)}")
    if args.rounds < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error(f"--rounds {args.rounds} and --repeats {args.repeats} must be >= 1, --warmup {args.warmup} >= 0")
    if args.device == "cuda":
        print("NOTE: the --device cuda path has not been run on a GPU yet (none was available when it was written)")
    for line in machine_lines(args.device):
        print(line)
    environment = worker_environment(args)
    if args.check:
        command = [sys.executable, "-c", "import sys, moe_check; sys.exit(moe_check.run_check(*sys.argv[1:]))",
                   names[0], args.device, *([args.tinymoe_kernels] if args.tinymoe_kernels else [])]
        return subprocess.run(command, env=environment, cwd=os.path.dirname(os.path.abspath(__file__))).returncode
    print(f"rows {', '.join(rows)}: {args.rounds} alternated rounds, each worker {args.warmup} warm-up + "
          f"{args.repeats} timed calls (median); device {args.device}")
    started, report = time.perf_counter(), {"machine": machine_lines(args.device), "shapes": {}}
    for name in names:
        print(f"\n{describe_shape(name)}")
        results = measure_shape(args, name, rows, environment)
        entry = {"workers": results, "derived": report_shape(args, name, results)}
        if args.memory:
            entry["memory"] = measure_memory(args, name, rows, environment)
        report["shapes"][name] = entry
    leaked = [name for name in ("numpy", "torch", "tinymoe", "numba") if name in sys.modules]
    print(f"\nparent process imported {', '.join(leaked) if leaked else 'none of numpy, torch, tinymoe, numba'}")
    print(f"wall time {time.perf_counter() - started:.0f} s; load average now "
          f"{', '.join(f'{value:.2f}' for value in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
