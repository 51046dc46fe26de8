"""`tinymoe <command>`: argument parsing and the one-line error report for mistakes a user can make."""
from __future__ import annotations

import argparse
import os
import sys

from ..engine.backend import BackendUnavailableError


class UsageError(Exception):
    """A problem with what the user asked for; reported as one line, exit status 2."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we print the error alone, on one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import gradcheck_command, info_command, sample_command, train_command

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
