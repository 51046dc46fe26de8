"""`tinymoe doctor RUN_DIR`: read a training run and say what is wrong with it (overfitting, routing collapse,
dropped tokens, expert-parallel rank imbalance, memory), with the numbers that show it and the command to try
next. Exit status 0 whether or not problems are found (the report is the result); 2 when RUN_DIR is not a run."""
from __future__ import annotations

import json
import re

from .arguments import UsageError, add_option

_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
          "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}


def byte_count(text: str) -> int:
    """A positive number of bytes: 17179869184, 16G (10⁹), 16GiB or 16Gi (2³⁰), 512M, 1.5T."""
    import argparse

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a number of bytes like 17179869184, 16G or 16GiB, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def add_parser(commands) -> None:
    parser = commands.add_parser("doctor", help="diagnose a training run", description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a training --out directory (metrics.jsonl, summary.json, checkpoint.npz)")
    add_option(parser, "--json", action="store_true", help="print the report as one JSON object instead of text")
    add_option(parser, "--memory", metavar="BYTES", type=byte_count,
               help="memory a training step must fit in, e.g. 80GiB for a GPU (suffixes k, M, G, T; Ki, Mi, Gi, Ti)",
               default_text="MemTotal of /proc/meminfo")
    parser.set_defaults(run=run_doctor)


def run_doctor(args) -> int:
    from ..train.doctor import diagnose

    try:
        report = (diagnose(args.run_dir) if args.memory is None
                  else diagnose(args.run_dir, memory_bytes=args.memory, memory_name="--memory"))
    except ValueError as error:
        raise UsageError(str(error).removeprefix("diagnose: ")) from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0
