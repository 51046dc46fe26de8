"""Reused memory for the large NumPy buffers of the MoE hot path, so that a training step does not page-fault.

Each step of an MoE layer allocates a few hundred MB of large buffers (dispatched rows, the experts' [a | b],
their gradients) and frees them again. NumPy returns such buffers to the operating system at once (they are
mmap'd), so the next step's buffers are fresh pages: the kernel zeroes every page on first touch. On the
cpu-small benchmark shape that is ~11 000 page faults and 50-70 ms of system CPU per step, ~15% of the step.
(The C library can be told to keep freed memory, but only through process-wide settings, which a library
must not change.)

`empty(shape, dtype)` returns an array like `np.empty`'s, whose memory comes from a free list of blocks this
module keeps (anonymous mmaps, madvise'd for huge pages as NumPy does for its own large arrays). A block goes
back to the free list only when the array handed out AND every view derived from it are gone (a
weakref.finalize on the array; its views keep it alive, because its memory belongs to an mmap, not to an
ndarray): a block in use is never handed out twice, whatever the caller keeps. Values are never read before
they are written (np.empty semantics), so reuse changes no result.

    empty(shape, dtype, xp=np)   a workspace array (xp other than NumPy, or under MIN_BYTES: xp.empty)
    set_limit(n_bytes)           most bytes of free blocks kept (default: DEFAULT_LIMIT); 0 keeps none
    release()                    drop every free block (their memory goes back to the system)
    stats()                      {"free_bytes", "free_blocks", "reused", "created"}
"""
from __future__ import annotations

import math
import mmap
import os
import queue
import threading
import weakref

import numpy as np

from .checks import require_int

MIN_BYTES = 1 << 20          # smaller arrays come from np.empty (malloc keeps those itself)
BLOCK_GRANULE = 2 << 20      # blocks are whole huge pages


def _memory_bytes() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit when that is lower (containers)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                value = handle.read().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def _default_limit() -> int:
    """A quarter of the memory this process may use (1 GiB where it cannot be read): room for the large
    buffers of one training step, which reuse needs in full (with less, the oldest blocks go and come back as
    fresh pages)."""
    try:
        return _memory_bytes() // 4
    except (AttributeError, ValueError, OSError):
        return 1 << 30


DEFAULT_LIMIT = _default_limit()  # free blocks kept at most (bytes); the oldest are dropped first
_SLACK = 1.25                # a free block serves a request of up to this many times fewer bytes

# Blocks come back from weakref finalizers, which may run on any thread at any allocation (a garbage
# collection inside this module's own code included): they only put the block on a lock-free queue, and the
# functions below move the queue into the free list under _lock. (A finalizer taking _lock could deadlock on
# the thread that holds it.)
_lock = threading.Lock()
_returned = queue.SimpleQueue()
_state = {"free": [], "free_bytes": 0, "limit": DEFAULT_LIMIT, "reused": 0, "created": 0}


def _reset_after_fork() -> None:
    """In a forked child: a fresh lock (the parent's may have been held by another thread at the fork)."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _new_block(n_bytes: int) -> mmap.mmap:
    size = max(BLOCK_GRANULE, math.ceil(n_bytes / BLOCK_GRANULE) * BLOCK_GRANULE)
    # Private, as malloc's memory: mmap's default for anonymous maps is MAP_SHARED, whose pages a forked child
    # would share with this process (and which is shmem, without transparent huge pages).
    private = getattr(mmap, "MAP_PRIVATE", None)
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
    if private is None or anonymous is None:  # not a POSIX mmap (Windows): the default map is private
        block = mmap.mmap(-1, size)
    else:
        block = mmap.mmap(-1, size, flags=private | anonymous)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            block.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: ordinary pages
            pass
    return block


def _collect_returned() -> None:
    """Move the blocks finalizers returned into the free list, then trim it to the limit (caller holds _lock)."""
    while True:
        try:
            block = _returned.get_nowait()
        except queue.Empty:
            break
        _state["free"].append(block)
        _state["free_bytes"] += len(block)
    free = _state["free"]
    while free and _state["free_bytes"] > _state["limit"]:
        _state["free_bytes"] -= len(free.pop(0))


def _take(n_bytes: int):
    """The smallest free block that fits n_bytes without wasting more than _SLACK, removed from the list."""
    with _lock:
        _collect_returned()
        best = None
        for index, block in enumerate(_state["free"]):
            if n_bytes <= len(block) <= n_bytes * _SLACK + BLOCK_GRANULE and (best is None or len(block) < best[0]):
                best = (len(block), index)
        if best is None:
            _state["created"] += 1
            return None
        block = _state["free"].pop(best[1])
        _state["free_bytes"] -= len(block)
        _state["reused"] += 1
        return block


def empty(shape, dtype, xp=np):
    """An uninitialised array of `shape` and `dtype` (like xp.empty), on reused memory when it is a NumPy array
    of at least MIN_BYTES (see the module docstring)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    n_bytes = math.prod(shape) * dtype.itemsize
    if xp is not np or n_bytes < MIN_BYTES:
        return xp.empty(shape, dtype)
    block = _take(n_bytes)
    if block is None:
        block = _new_block(n_bytes)
    array = np.ndarray(shape, dtype, buffer=block)
    weakref.finalize(array, _returned.put, block).atexit = False
    return array


def empty_like(array, xp=np):
    """`empty(array.shape, array.dtype, xp)`."""
    return empty(array.shape, array.dtype, xp)


def set_limit(n_bytes: int) -> None:
    """Keep at most n_bytes of free blocks (0: none; blocks then go back to the system as soon as freed)."""
    n_bytes = require_int(n_bytes, "n_bytes", "workspace.set_limit", low=0)
    with _lock:
        _state["limit"] = n_bytes
        _collect_returned()


def release() -> None:
    """Drop every free block (blocks in use return to the list when their arrays are gone, as usual)."""
    with _lock:
        _collect_returned()
        _state["free"].clear()
        _state["free_bytes"] = 0


def stats() -> dict:
    """free_bytes / free_blocks kept now; reused / created: requests served from the list / by a new block."""
    with _lock:
        _collect_returned()
        return {"free_bytes": _state["free_bytes"], "free_blocks": len(_state["free"]),
                "reused": _state["reused"], "created": _state["created"]}


__all__ = ["DEFAULT_LIMIT", "MIN_BYTES", "empty", "empty_like", "release", "set_limit", "stats"]
