"""Atomic file writes: write a temporary file beside the target, flush it to disk, then rename over the target.
A reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import re
import secrets

_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{16}-(.+)")


def temporary_path(path) -> str:
    """A fresh temporary name beside `path`: DIR/.tmp-<16 hex digits>-NAME."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{name}")


def is_temporary_of(filename: str, name: str) -> bool:
    """Whether `filename` (a bare file name) is a temporary file atomic_write made for a file called `name`."""
    match = _TEMPORARY.fullmatch(filename)
    return bool(match) and match.group(1) == name


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file object for a temporary file that replaces `path` only if the block finishes.

    The temporary file is created with mode 0o666 less the umask, as open() would make `path` itself
    (tempfile.mkstemp would make it 0o600, and reading the umask means changing it, for every thread).
    """
    path = os.fspath(path)
    temporary = temporary_path(path)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
