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
import threading
import weakref

import numpy as np

MIN_BYTES = 1 << 20          # smaller arrays come from np.empty (malloc keeps those itself)
BLOCK_GRANULE = 2 << 20      # blocks are whole huge pages


def _default_limit() -> int:
    """A quarter of the machine's memory (1 GiB where it cannot be read): room for the large buffers of one
    training step, which reuse needs in full (with less, the oldest blocks go and come back as fresh pages)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, ValueError, OSError):
        return 1 << 30


DEFAULT_LIMIT = _default_limit()  # free blocks kept at most (bytes); the oldest are dropped first
_SLACK = 1.25                # a free block serves a request of up to this many times fewer bytes

_lock = threading.Lock()
_state = {"free": [], "free_bytes": 0, "limit": DEFAULT_LIMIT, "reused": 0, "created": 0}


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


def _take(n_bytes: int):
    """The smallest free block that fits n_bytes without wasting more than _SLACK, removed from the list."""
    with _lock:
        fitting = [(len(block), index) for index, block in enumerate(_state["free"])
                   if n_bytes <= len(block) <= n_bytes * _SLACK + BLOCK_GRANULE]
        if not fitting:
            return None
        _, index = min(fitting)
        block = _state["free"].pop(index)
        _state["free_bytes"] -= len(block)
        _state["reused"] += 1
        return block


def _trim() -> None:
    """Drop the oldest free blocks until the rest fit the limit (caller holds _lock)."""
    free = _state["free"]
    while free and _state["free_bytes"] > _state["limit"]:
        _state["free_bytes"] -= len(free.pop(0))


def _give_back(block) -> None:
    with _lock:
        _state["free"].append(block)
        _state["free_bytes"] += len(block)
        _trim()


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
        with _lock:
            _state["created"] += 1
    array = np.ndarray(shape, dtype, buffer=block)
    weakref.finalize(array, _give_back, block).atexit = False
    return array


def empty_like(array, xp=np):
    """`empty(array.shape, array.dtype, xp)`."""
    return empty(array.shape, array.dtype, xp)


def set_limit(n_bytes: int) -> None:
    """Keep at most n_bytes of free blocks (0: none; blocks then go back to the system as soon as freed)."""
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, (int, np.integer)) or n_bytes < 0:
        raise ValueError(f"workspace.set_limit: n_bytes={n_bytes!r} must be an int >= 0")
    with _lock:
        _state["limit"] = int(n_bytes)
        _trim()


def release() -> None:
    """Drop every free block (blocks in use return to the list when their arrays are gone, as usual)."""
    with _lock:
        _state["free"].clear()
        _state["free_bytes"] = 0


def stats() -> dict:
    """free_bytes / free_blocks kept now; reused / created: requests served from the list / by a new block."""
    with _lock:
        return {"free_bytes": _state["free_bytes"], "free_blocks": len(_state["free"]),
                "reused": _state["reused"], "created": _state["created"]}


__all__ = ["DEFAULT_LIMIT", "MIN_BYTES", "empty", "empty_like", "release", "set_limit", "stats"]
