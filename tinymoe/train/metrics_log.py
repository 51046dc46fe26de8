"""metrics.jsonl, the log of a training run: one JSON object per evaluation, appended as the run goes.

A crash or a full disk in the middle of an append leaves a torn last line (a prefix of the object, or NUL
bytes where the file system had reserved the block); that line is the only one that can be incomplete, so
`read_metrics` skips it with a warning and keeps every whole line. A damaged line anywhere else means the file
was edited or corrupted: MetricsLogError names the file and the line.
"""
from __future__ import annotations

import json
import os

from ..io.atomic import atomic_write

METRICS_NAME = "metrics.jsonl"


class MetricsLogError(ValueError):
    """metrics.jsonl cannot be read: a damaged line before the last one. The message names file and line."""


def append_metrics(path, row: dict) -> None:
    """Add one row (one line) at the end of the log at `path`."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def rewrite_metrics(path, rows: list) -> None:
    """Replace the log at `path` by `rows`, atomically."""
    with atomic_write(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def read_metrics(path, up_to_step: int | None = None, warn=None) -> list:
    """The rows of the log at `path` ([] if there is none), those with step <= up_to_step when given.

    A torn last line is skipped and reported through `warn(message)` (one line); a line that is not a JSON
    object with an integer "step" anywhere before it raises MetricsLogError naming `path` and its line number.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as handle:
        raw = handle.read()
    whole = raw.rstrip(b"\x00")  # NUL padding: the block of a write that never landed
    lines = whole.split(b"\n")
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    rows, torn_line = [], None
    for position, (number, line) in enumerate(numbered):
        problem, row = _parse(line)
        if problem is None:
            if up_to_step is None or row["step"] <= up_to_step:
                rows.append(row)
            continue
        torn = not raw.endswith(b"\n") or b"\x00" in line  # an append writes its newline last
        if position == len(numbered) - 1 and torn:
            torn_line = number
            break
        raise MetricsLogError(f"{path} line {number} is damaged ({problem}); delete that line or the file "
                              "(the checkpoint does not depend on it)")
    if torn_line is None and len(whole) < len(raw):
        torn_line = len(lines) + (0 if whole.endswith(b"\n") else 1)  # the line the padding stands for
    if torn_line is not None and warn is not None:
        warn(f"{path}: skipped its torn last line {torn_line} (written when a run was interrupted; "
             f"{len(rows)} whole line(s) kept)")
    return rows


def _parse(line: bytes):
    """(None, row) for a whole row; (what is wrong, None) otherwise."""
    if b"\x00" in line:
        return "it holds NUL bytes", None
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return f"not JSON: {error}", None
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object", None
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return f"step={step!r} is not an integer", None
    return None, row
