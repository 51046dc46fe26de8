"""Where the time of `tinymoe train` goes: cProfile of a few training steps with the command's defaults.

    python perf/profile_train.py                    # 30 steps of `tinymoe train` defaults, in this process
    python perf/profile_train.py --steps 5 --top 15 # a quick look
    python perf/profile_train.py -- --experts 8     # anything after -- goes to `tinymoe train`

Runs the command line's own entry point (tinymoe.cli.main.main) in-process: first once with --steps 1,
unprofiled (imports, Numba compilation or cache loading, matplotlib), then profiled with --steps N into a
temporary --out directory, evaluating only at the last step. Prints the top functions by cumulative and by
self time, then the self time per tinymoe source file, where time spent in NumPy, Numba or the standard
library is charged to the tinymoe function that called it (split over callers by the time each call took):
so functional/attention.py holds attention's matmuls and softmax, functional/norms.py the norms,
functional/losses.py the cross-entropy, nn/ + kernels/ the MoE. cProfile's per-call overhead inflates
Python-heavy code (the autograd engine) relative to the array work; compare the wall times printed.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict

AREAS = [  # (area, substrings of the path inside the tinymoe package), first match wins
    ("attention", ("attention", "rotary")),
    ("norms", ("norms",)),
    ("cross-entropy and softmax", ("losses", "softmax")),
    ("MoE (router, dispatch, experts, kernels)", ("nn/moe", "nn/router", "nn/gating", "experts", "dispatch", "kernels/",
                                                  "all_to_all")),
    ("linear and embedding", ("linear", "layers", "indexing")),
    ("activations, dropout", ("activations", "dropout")),
    ("autograd engine and tensor ops", ("engine/",)),
    ("optimizer and schedule", ("optim/",)),
    ("training loop, data, checkpoints, plots", ("train/", "cli/", "io/")),
    ("model wiring", ("models/", "nn/")),
]


def tinymoe_root() -> str:
    import tinymoe

    return os.path.dirname(os.path.abspath(tinymoe.__file__)) + os.sep


def run_train(extra, steps, out_dir) -> int:
    from tinymoe.cli.main import main

    return main(["train", "--steps", str(steps), "--eval-every", str(steps), "--out", out_dir, *extra])


def charge_to_tinymoe(stats: pstats.Stats, root: str) -> dict:
    """{tinymoe file (relative path): seconds}: every function's self time, charged to the nearest tinymoe
    function up the call graph (split over callers in proportion to the time each caller's calls took)."""
    table = stats.stats  # (file, line, name) -> (primitive calls, calls, self s, cumulative s, callers)
    memo = {}

    def shares(function, visiting):
        if function in memo:
            return memo[function]
        filename = function[0]
        if filename.startswith(root):
            result = {filename[len(root):]: 1.0}
        elif function not in table or not _acyclic_callers(table, function, visiting):
            result = {f"(outside tinymoe) {_package_of(function)}": 1.0}
        else:
            callers = _acyclic_callers(table, function, visiting)  # recursion (a draw() calling draw()) skipped
            weights = {caller: edge[2] for caller, edge in callers.items()}
            total = sum(weights.values())
            if total <= 0:
                weights, total = {caller: edge[1] for caller, edge in callers.items()}, sum(edge[1] for edge in callers.values())
            result = defaultdict(float)
            for caller, weight in weights.items():
                for label, fraction in shares(caller, visiting | {function}).items():
                    result[label] += fraction * weight / max(total, 1e-300)
            result = dict(result)
        memo[function] = result
        return result

    charged = defaultdict(float)
    for function, (_, _, self_seconds, _, _) in table.items():
        for label, fraction in shares(function, frozenset()).items():
            charged[label] += self_seconds * fraction
    return dict(charged)


def _package_of(function) -> str:
    """'matplotlib', 'numpy', ... for a file under site-packages; the module file for the standard library."""
    filename = function[0]
    if filename in ("~", ""):
        return function[2]  # a built-in, e.g. <built-in method time.sleep>
    parts = filename.replace(os.sep, "/").split("/")
    if "site-packages" in parts and parts.index("site-packages") + 1 < len(parts):
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    return os.path.basename(filename)


def _acyclic_callers(table, function, visiting) -> dict:
    return {caller: edge for caller, edge in table[function][4].items() if caller not in visiting and caller != function}


def area_of(label: str) -> str:
    if label.startswith("(outside"):
        return "outside tinymoe (no tinymoe caller: imports, matplotlib drawing, ...)"
    for area, keys in AREAS:
        if any(key in label for key in keys):
            return area
    return "other tinymoe"


def print_table(title, seconds_by_label, total, top):
    print(f"\n{title}")
    for label, seconds in sorted(seconds_by_label.items(), key=lambda item: -item[1])[:top]:
        print(f"  {seconds:8.3f} s {100 * seconds / total:5.1f}%  {label}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="profiled training steps")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unprofiled --steps 1 run")
    parser.add_argument("--save", metavar="FILE", help="also write the raw profile (pstats format, e.g. for snakeviz)")
    args = parser.parse_args(own)
    root = tinymoe_root()
    with tempfile.TemporaryDirectory(prefix="tinymoe-profile-") as out_dir:
        if not args.no_warmup:
            started = time.perf_counter()
            run_train(extra, 1, os.path.join(out_dir, "warmup"))
            print(f"[warm-up run, --steps 1, unprofiled: {time.perf_counter() - started:.1f} s]")
        started = time.perf_counter()
        run_train(extra, args.steps, os.path.join(out_dir, "unprofiled"))
        unprofiled = time.perf_counter() - started
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        status = run_train(extra, args.steps, os.path.join(out_dir, "profiled"))
        profiler.disable()
        profiled = time.perf_counter() - started
    print(f"\n`tinymoe train --steps {args.steps} {' '.join(extra)}`: {unprofiled:.2f} s unprofiled, "
          f"{profiled:.2f} s under cProfile (exit status {status})")
    if args.save:
        profiler.dump_stats(args.save)
    for order, title in (("cumulative", "cumulative time"), ("tottime", "self time")):
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.strip_dirs().sort_stats(order).print_stats(args.top)
        lines = buffer.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
        print(f"\ntop {args.top} functions by {title}:")
        print("\n".join(lines[start:]).rstrip())
    charged = charge_to_tinymoe(pstats.Stats(profiler), root)
    total = sum(charged.values())
    print_table(f"self time per tinymoe file, library calls charged to their tinymoe caller ({total:.2f} s profiled):",
                charged, total, args.top)
    areas = defaultdict(float)
    for label, seconds in charged.items():
        areas[area_of(label)] += seconds
    print_table("by area:", areas, total, len(areas))
    return status


if __name__ == "__main__":
    sys.exit(main())
