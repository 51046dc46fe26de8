"""What every benchmark in perf/ shares: the shapes, the FLOP count, and a description of the machine.

Standard library only, so that bench_moe.py's parent process can use it without importing NumPy, torch or
tinymoe (nothing it loads can leak into the rows it times). Shapes are those of shared/BENCHMARKS.md.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys

SHAPES = {  # name: (T tokens, d_model, d_ff, E experts, k)
    "tiny": (256, 64, 128, 4, 2),            # for testing the scripts, not a measurement
    "cpu-small": (4096, 512, 1024, 8, 2),
    "mixtral-like": (16384, 1024, 2816, 8, 2),
    "fine-grained": (16384, 1024, 512, 64, 6),
}

ROWS = ("tinymoe", "torch-loop", "torch-sort", "floor", "floor-fused", "matmul")  # bench_moe.py's rows (see moe_rows.py)
LAYER_ROWS = ("tinymoe", "torch-loop", "torch-sort")             # the rows that are a whole MoE layer
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}                         # the square matmul row: size² float32
OPENBLAS_TUNING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def flops(shape) -> float:
    """FLOPs of one forward + backward, expert matmuls only: 3 · T·k · 6·d·ff (router ignored)."""
    tokens, d_model, d_ff, _, top_k = shape
    return 3.0 * tokens * top_k * 6.0 * d_model * d_ff


def describe_shape(name) -> str:
    tokens, d_model, d_ff, n_experts, top_k = SHAPES[name]
    return (f"{name}: T={tokens} d={d_model} ff={d_ff} E={n_experts} k={top_k}, "
            f"{flops(SHAPES[name]) / 1e9:.2f} GFLOP per step")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(default=512 * 2**20) -> int:
    """Size of the largest CPU cache from sysfs (L3 on most machines); `default` when sysfs does not say."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as handle:
                    text = handle.read().strip()
            except OSError:
                continue
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    except (OSError, ValueError):
        pass
    return max(sizes) if sizes else default


def version(distribution) -> str:
    """Installed version of a distribution, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(device="cpu") -> list:
    """Lines describing where and how a benchmark ran: command, date, machine, library versions, environment."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    libraries = ["numpy", "numba", "torch", "threadpoolctl", "tinymoe"]
    if device == "cuda":
        libraries += ["cupy-cuda12x", "cupy-cuda13x"]
    versions = ", ".join(f"{name} {version(name)}" for name in libraries)
    tuning = {name: os.environ[name] for name in OPENBLAS_TUNING_VARIABLES if name in os.environ}
    threads = {name: os.environ[name] for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                   "NUMBA_NUM_THREADS", "TINYMOE_KERNELS") if name in os.environ}
    return [
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {cpu_model()}, {cores} logical CPUs ({usable} usable), largest cache "
        f"{last_level_cache_bytes() / 2**20:.0f} MiB, {platform.system()} {platform.release()}, "
        f"load average {load}",
        f"python {platform.python_version()}; {versions}",
        f"environment: OpenBLAS tuning {tuning or 'none set'}; thread settings {threads or 'none set'}",
    ]


def summarize_threadpools(info) -> str:
    """One line from threadpoolctl.threadpool_info(): which BLAS/OpenMP libraries, kernels and thread counts."""
    parts = []
    for pool in info:
        text = f"{pool.get('internal_api')} {pool.get('version')}"
        if pool.get("architecture"):
            text += f" [{pool['architecture']}]"  # OpenBLAS: the core type whose kernels run
        if pool.get("threading_layer") and pool.get("user_api") == "blas":
            text += f" {pool['threading_layer']}"
        parts.append(f"{text} x{pool.get('num_threads')}")
    return "; ".join(sorted(parts)) if parts else "none loaded"


def threadpool_info() -> list:
    """threadpoolctl's view of the loaded BLAS/OpenMP pools (an empty list without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info as info
    except ImportError:
        return []
    return [{key: value for key, value in pool.items() if key != "filepath"} | {"file": os.path.basename(pool["filepath"])}
            for pool in info()]


def status_kib(field) -> int:
    """A field of /proc/self/status in KiB (VmRSS:, VmHWM:); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident size (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc malloc_trim), so a measured call has to fault in
    every page it uses instead of reusing pages that earlier set-up freed but kept resident."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
