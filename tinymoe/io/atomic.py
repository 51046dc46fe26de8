"""Atomic file writes: write a temporary file beside the target, flush it to disk, then rename over the target.
A reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file object for a temporary file that replaces `path` only if the block finishes."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; a plain open() honours the umask
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
