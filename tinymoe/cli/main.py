"""`tinymoe <command>`: argument parsing and the one-line error report.

Exit status: 0 done; 1 a run that could not finish (bad checkpoint or data, disk full, diverged training);
2 a usage error (a bad option, or options that contradict the run in --out); 70 an internal error (a bug:
please report it); 130 interrupted (Ctrl-C). `doctor` exits 0 whether or not it finds problems (the report is
its result), `gradcheck` 1 when a check fails. Every error is one line on stderr; TINYMOE_DEBUG=1 raises it
with its traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys


INTERNAL_ERROR = 70  # EX_SOFTWARE of sysexits.h


def build_parser() -> argparse.ArgumentParser:
    from . import (doctor_command, estimate_command, generate_command, gradcheck_command, info_command,
                   sample_command, train_command)
    from .arguments import OneLineErrorParser

    parser = OneLineErrorParser(prog="tinymoe", description="A small Mixture-of-Experts engine over NumPy/CuPy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train_command, sample_command, generate_command, estimate_command, doctor_command,
                   gradcheck_command, info_command):
        module.add_parser(commands)
    return parser


def main(argv=None) -> int:
    from ..engine.backend import BackendUnavailableError
    from ..train.checkpoint import CheckpointError
    from ..train.data import DataError
    from ..train.metrics_log import MetricsLogError
    from .arguments import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    user_errors = (UsageError, BackendUnavailableError, CheckpointError, DataError, MetricsLogError, OSError,
                   FloatingPointError)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("tinymoe: interrupted", file=sys.stderr)
        return 130
    except user_errors as error:
        if os.environ.get("TINYMOE_DEBUG"):
            raise
        message = " ".join(str(error).split("\n")).strip() or type(error).__name__
        print(f"tinymoe {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except Exception as error:  # a bug, not something the user did: say so instead of passing it off as advice
        if os.environ.get("TINYMOE_DEBUG"):
            raise
        print(f"tinymoe {args.command}: internal error: {type(error).__name__}: {_first_line(error)} (please report; "
              "TINYMOE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return INTERNAL_ERROR


def _first_line(error) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
