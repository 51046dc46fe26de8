"""One thread per CPU core, shared by the Numba kernels (row ranges) and the expert blocks (functional/experts.py).

Why not Numba's own `parallel=True` threads: with its OpenMP layer, each parallel region leaves its worker
threads spinning for a while (≈3.5 ms of a core per region on a 2-core Xeon, libgomp's default wait policy),
and a cpu-small MoE step runs ~20 regions, so the spinning takes cores from the OpenBLAS matmuls next to them;
the remedy, OMP_WAIT_POLICY=PASSIVE, is process-wide and read once, so a library cannot set it. The kernels
are plain compiled loops that release the GIL; threads of this pool wait on a lock when idle (no spinning)
and each runs a kernel on a contiguous range of output rows. Every output row still has one owner and one
fixed order of additions: results are identical to a single-threaded run, whatever the number of cores.

    for_rows(n_rows, call, work)   call(start, stop) over one range of rows per core (inline when small)
    run_all(work, items)           [work(item) for item in items] over the pool, results in order
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_THREAD_PREFIX = "tinymoe-cpu"
# Below this many output elements a kernel runs on the calling thread: waking a pool thread costs ~80-100 µs
# on a 2-core VM, more than such a kernel takes (gather_rows and swiglu break even near 5·10⁵ elements).
MIN_PARALLEL_ELEMENTS = 1 << 19

_lock = threading.Lock()
_state = {"executor": None, "workers": 0}


def _reset_after_fork() -> None:
    """In a forked child: no pool (its threads did not survive the fork) and a fresh lock."""
    global _lock
    _lock = threading.Lock()
    _state["executor"], _state["workers"] = None, 0
    _blas["regions"], _blas["limiter"] = 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def in_worker() -> bool:
    """Whether the calling thread is one of this pool's (work submitted from it must run inline: no waiting
    on our own pool)."""
    return threading.current_thread().name.startswith(_THREAD_PREFIX)


def executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool of max(workers, cores()) threads, made once (and replaced, the old one shut down, only if
    a caller ever asks for more threads than cores)."""
    with _lock:
        if _state["workers"] < workers:
            if _state["executor"] is not None:
                _state["executor"].shutdown(wait=False)
            _state["workers"] = max(workers, cores())
            _state["executor"] = ThreadPoolExecutor(_state["workers"], thread_name_prefix=_THREAD_PREFIX)
        return _state["executor"]


def run_all(work, items) -> list:
    """[work(item) for item in items], spread over the pool (inline with one core, one item or from a worker)."""
    items = list(items)
    workers = min(cores(), len(items))
    if workers < 2 or in_worker():
        return [work(item) for item in items]
    return list(executor(workers).map(work, items))


def row_ranges(n_rows: int, parts: int) -> list:
    """`parts` contiguous (start, stop) ranges covering [0, n_rows), sizes differing by at most one."""
    parts = max(1, min(parts, n_rows))
    return [(n_rows * part // parts, n_rows * (part + 1) // parts) for part in range(parts)]


def for_rows(n_rows: int, call, elements: int) -> None:
    """call(start, stop) over [0, n_rows): one range per core on the pool when `elements` (the output's size)
    is large enough, else one call on the calling thread. `call` must write only its own rows."""
    parts = cores() if elements >= MIN_PARALLEL_ELEMENTS and not in_worker() else 1
    ranges = row_ranges(n_rows, parts)
    if len(ranges) == 1:
        call(*ranges[0])
        return
    futures = [executor(len(ranges) - 1).submit(call, *bounds) for bounds in ranges[1:]]
    try:
        call(*ranges[0])  # the calling thread takes the first range instead of waiting for a worker to
    except BaseException:
        for future in futures:
            future.exception()  # wait for the workers (their rows are written or not; the caller's error wins)
        raise
    for future in futures:
        future.result()


# ----- one-thread BLAS for a region ---------------------------------------------------------------------------
# OpenBLAS has no per-thread setting: the limit, set through threadpoolctl (when importable), is process-wide
# for the duration of the region and restored after; the first of concurrent regions sets it, the last
# restores it. BLAS calls other threads make meanwhile run on one thread too.
_blas = {"controller": None, "limiter": None, "regions": 0}


def blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries, found once; None without threadpoolctl (or
    without a BLAS it can limit)."""
    with _lock:
        if _blas["controller"] is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                _blas["controller"] = False
            else:
                blas = ThreadpoolController().select(user_api="blas")
                _blas["controller"] = blas if blas.lib_controllers else False
    return _blas["controller"] or None


def enter_one_thread_blas() -> None:
    """Start a one-thread BLAS region (needs `blas_controller()`); pair with `leave_one_thread_blas`."""
    with _lock:
        if _blas["regions"] == 0:
            _blas["limiter"] = _blas["controller"].limit(limits=1)
        _blas["regions"] += 1


def leave_one_thread_blas() -> None:
    with _lock:
        _blas["regions"] -= 1
        if _blas["regions"] == 0:
            _blas["limiter"].restore_original_limits()
            _blas["limiter"] = None


def one_thread_blas(product):
    """product() with BLAS on one thread when threadpoolctl can limit it, else product() as is."""
    if blas_controller() is None:
        return product()
    enter_one_thread_blas()
    try:
        return product()
    finally:
        leave_one_thread_blas()
