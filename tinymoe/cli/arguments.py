"""Argument parsing shared by the `tinymoe` commands: the error type, value parsers, the parser class, help
with each default shown once, and the MoE options generated from MoEConfig's fields."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from ..engine.backend import BackendUnavailableError, import_cupy


class UsageError(Exception):
    """A problem with what the user asked for; reported as one line, exit status 2."""


def positive_int(text: str) -> int:
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


def learning_rate(text: str) -> float:
    """A learning rate for AdamW: finite, > 0 and at most 1 (AdamW moves each weight by about lr per step, so
    more than 1 only ever diverges)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def fraction_below_one(text: str) -> float:
    value = non_negative_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def check_device(device: str) -> None:
    """UsageError unless `device` can run here (for "cuda": CuPy imports and sees a GPU)."""
    if device == "cuda":
        try:
            import_cupy()
        except BackendUnavailableError as error:
            raise UsageError(f"--device cuda: {error}") from None


def prepare_run(args) -> None:
    """What every command that runs a model checks and sets first: a usable TINYMOE_KERNELS (unless --kernels
    overrides it), the device, then --matmul-precision and --kernels where the command has them."""
    from .. import kernels
    from ..engine.backend import set_matmul_precision

    forced = getattr(args, "kernels", None)
    if forced is None and kernels.environment_problem():
        raise UsageError(kernels.environment_problem())
    check_device(args.device)
    if getattr(args, "matmul_precision", None) is not None:
        set_matmul_precision(args.matmul_precision)
    if forced:
        kernels.use(forced)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we print the error alone, on one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_option(group, flag: str, *, help: str, default=None, default_text: str | None = None, **kwargs):
    """add_argument with `help` ending in "(default: ...)" exactly once; default_text replaces the value shown
    (e.g. "dropless" for None); store_true flags show "off"; required options "none; required"."""
    action = group.add_argument(flag, default=default, **kwargs)
    if kwargs.get("required"):
        action.help = f"{help} (default: none; required)"
        return action
    if default_text is None:
        default_text = "off" if kwargs.get("action") == "store_true" else _shown(default)
    action.help = f"{help} (default: {default_text})"  # set after creation: BooleanOptionalAction adds its own
    return action


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value).replace("%", "%%")


def add_config_options(group, config_class, defaults: dict | None = None) -> list:
    """One option per field of the dataclass `config_class` whose metadata names a "flag": its type, choices,
    help ("help", with "paper" in brackets) and default (`defaults` overrides the field's) come from the field.
    Values are parsed, then checked by the field's own metadata["check"]. Returns the field names added."""
    defaults = defaults or {}
    hints = typing.get_type_hints(config_class)
    added = []
    for option in dataclasses.fields(config_class):
        meta = option.metadata
        if not meta.get("flag"):
            continue
        default = defaults.get(option.name, option.default)
        if default is dataclasses.MISSING:
            raise ValueError(f"{config_class.__name__}.{option.name} needs a default to become --{meta['flag']}")
        help_text = meta["help"] + (f" [{meta['paper']}]" if meta.get("paper") else "")
        kwargs = {"dest": option.name}
        if hints[option.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["type"] = _field_parser(option, hints[option.name])
            kwargs["metavar"] = "N" if _number_type(hints[option.name]) is int else "X"
        default_text = meta.get("none_means") if default is None else None
        add_option(group, f"--{meta['flag']}", help=help_text, default=default, default_text=default_text, **kwargs)
        added.append(option.name)
    return added


def _number_type(hint):
    arguments = [argument for argument in typing.get_args(hint) if argument is not type(None)]
    return arguments[0] if arguments else hint


def _field_parser(option, hint):
    number = _number_type(hint)
    check = option.metadata["check"]

    def parse(text: str):
        value = _int(text, "an integer") if number is int else finite_float(text)
        try:
            return check(value, option.name)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[-1]) from None

    parse.__name__ = number.__name__  # argparse names the type in "invalid <type> value" messages
    return parse
