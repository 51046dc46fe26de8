"""`tinymoe <command>`: argument parsing and the one-line error report for mistakes a user can make."""
from __future__ import annotations

import argparse
import os
import sys

from ..engine.backend import BackendUnavailableError
from . import gradcheck_command, info_command, sample_command, train_command
from .arguments import OneLineErrorParser, UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="tinymoe", description="A small Mixture-of-Experts engine over NumPy/CuPy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train_command, sample_command, gradcheck_command, info_command):
        module.add_parser(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("tinymoe: interrupted", file=sys.stderr)
        return 130
    except (UsageError, BackendUnavailableError, ValueError, TypeError, OSError, FloatingPointError) as error:
        if os.environ.get("TINYMOE_DEBUG"):
            raise
        message = str(error) or type(error).__name__
        print(f"tinymoe {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
