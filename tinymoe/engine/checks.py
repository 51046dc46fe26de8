"""Argument checks shared by the public functions: bad input becomes an early error that names the op, the
argument, its value and what was expected, instead of a bare IndexError from deep inside NumPy."""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers

import numpy as np

from .backend import array_module, device_of, module_for_device
from .conversion import require_bool  # noqa: F401  (defined below Tensor, whose constructor uses it; public here)
from .function import DeviceMismatchError
from .tensor import Tensor


def describe(value) -> str:
    """A short description of an argument for error messages (arrays by type, shape and dtype)."""
    if isinstance(value, Tensor):
        return f"a {value.dtype.name} Tensor of shape {value.shape}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {value.dtype} {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def require_tensor(value, argument: str, op: str, ndim: int | None = None) -> Tensor:
    """`value` itself when it is a floating Tensor (with `ndim` axes, if given); a clear error otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {argument} must be a Tensor, got {describe(value)}; wrap arrays with tinymoe.tensor()")
    if value.dtype.kind != "f":
        raise TypeError(f"{op}: {argument} must be a floating Tensor, got {describe(value)}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{op}: {argument} must have {ndim} dimension(s), got shape {value.shape}")
    return value


def require_same_dtype(op: str, **tensors) -> None:
    """All named tensors share one dtype (NumPy would silently promote float32 with float64)."""
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} is {tensor.dtype.name} but {first_name} is {first.dtype.name}; "
                "cast one of them with .astype()"
            )


def require_number(value, argument: str, op: str, low=None, high=None, finite: bool = True) -> float:
    """`value` as a Python float (so it never promotes float32 data), checked against [low, high].

    Bools are refused (True is not a number here). finite=True (the default) refuses NaN and ±inf;
    finite=False lets ±inf through (and NaN, unless bounds are given: NaN lies in no interval).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {argument}={value!r} must be a {'finite ' if finite else ''}real number")
    value = float(value)
    if finite and not math.isfinite(value):
        raise TypeError(f"{op}: {argument}={value!r} must be a finite real number")
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        raise ValueError(f"{op}: {argument}={value!r} must be {_bounds(low, high)}")
    return value


def require_int(value, argument: str, op: str, low=None, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {argument}={value!r} must be an int")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{op}: {argument}={value} must be {_bounds(low, high)}")
    return value


def normalize_axis(axis, ndim: int, op: str, argument: str = "axis") -> int:
    """One axis in [-ndim, ndim) as a non-negative int (NumPy integers accepted, bools refused)."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{op}: {argument}={axis!r} must be an int")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: {argument}={axis} is out of range for an input with {ndim} dimension(s)")
    return int(axis) % ndim


def normalize_axes(axis, ndim: int, op: str, argument: str = "axis") -> tuple:
    """`axis` (None: every axis; an int; or a tuple/list of ints) as a sorted tuple of distinct non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    elif isinstance(axis, numbers.Integral) and not isinstance(axis, (bool, np.bool_)):
        axes = (axis,)
    else:
        raise TypeError(f"{op}: {argument}={axis!r} must be None, an int or a tuple of ints")
    normalized = []
    for value in axes:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{op}: {argument}={axis!r} must hold ints, got {value!r}")
        if not -ndim <= value < ndim:
            raise ValueError(f"{op}: {argument}={axis!r} is out of range for an input with {ndim} dimension(s)")
        normalized.append(int(value) % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{op}: {argument}={axis!r} repeats an axis")
    return tuple(sorted(normalized))


def normalize_permutation(axes, ndim: int, op: str, argument: str = "axes") -> tuple:
    """`axes` as a permutation of range(ndim) with negative axes made non-negative (transpose's argument)."""
    axes = tuple(axes)
    valid = all(isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_)) for a in axes)
    if valid and all(-ndim <= a < ndim for a in axes):
        normalized = tuple(int(a) % ndim for a in axes)
        if sorted(normalized) == list(range(ndim)):
            return normalized
    raise ValueError(f"{op}: {argument}={axes} is not a permutation of the {ndim} axes of the input")


def as_index_array(indices, argument: str, op: str, device: str | None = None):
    """`indices` as an integer array on `device` (default: where `indices` already live).

    Tensors hold floats, so they are refused; lists and scalars are converted; an array on another device
    raises DeviceMismatchError naming both.
    """
    if isinstance(indices, Tensor):
        raise TypeError(f"{op}: {argument} must be an integer array (NumPy or CuPy), got {describe(indices)}")
    source = device_of(indices)
    if device is None:
        device = source
    elif hasattr(indices, "dtype") and source != device:
        raise DeviceMismatchError(f"{op}: {argument} is on {source!r} but the tensor it indexes is on {device!r}")
    array = module_for_device(device).asarray(indices)
    if array.dtype.kind not in "iu":
        if array.size == 0 and not hasattr(indices, "dtype"):  # [] converts to float64
            return array.astype(np.int64)
        raise TypeError(f"{op}: {argument} must hold integers, got {describe(array)}")
    return array


def check_index_range(indices, upper: int, argument: str, op: str, ignore_index=None) -> None:
    """IndexError unless every index lies in [0, upper) (or equals `ignore_index` when one is given)."""
    in_range = (indices >= 0) & (indices < upper)
    if ignore_index is not None:
        in_range |= indices == ignore_index
    # One device-to-host sync on CUDA: a bad index must fail here, not gather garbage or fault later.
    if not bool(in_range.all()):
        first_bad = int(indices[~in_range].reshape(-1)[0])
        ignored = f" or equal ignore_index={ignore_index}" if ignore_index is not None else ""
        raise IndexError(f"{op}: {argument} holds {first_bad}; every entry must lie in [0, {upper}){ignored}")


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}"


# ----- finite checks of layer outputs ------------------------------------------------------------------------------
# Whether layers check their outputs for NaN and inf: a ContextVar, like the kernel choice (`kernels.use`), so
# `with finite_checks(False):` in one thread or task leaves the others checking.
_finite_checks = contextvars.ContextVar("tinymoe_finite_checks", default=True)


def finite_checks_enabled() -> bool:
    """True (the default) when layers raise FloatingPointError on a non-finite output."""
    return _finite_checks.get()


def set_finite_checks(enabled) -> None:
    """Turn the layers' finite checks on or off in the current context (thread or task).

    Each check is one reduction over a layer's output and one host sync (see `check_finite`); they cost well
    under 1% of a training step. Off, a NaN or overflow propagates silently (with NumPy RuntimeWarnings).
    """
    _finite_checks.set(require_bool(enabled, "enabled", "set_finite_checks"))


@contextlib.contextmanager
def finite_checks(enabled):
    """`with finite_checks(False):` turns the checks off inside the block and restores the previous setting."""
    token = _finite_checks.set(require_bool(enabled, "enabled", "finite_checks"))
    try:
        yield
    finally:
        _finite_checks.reset(token)


def all_finite(array) -> bool:
    """True when no entry of `array` is NaN or ±inf: one sum (one pass, no temporary) and one host sync.

    A sum is NaN or inf exactly when an entry is, or when finite entries overflow the dtype together
    (say 1e38 + 1e38 in float32); only then the exact entry-wise test runs, so finite data never fails.
    float16 is summed in float32 (its range, 65504, is overflowed by ordinary activations).
    """
    xp = array_module(array)
    accumulator = np.float32 if array.dtype == np.float16 else None
    with (np.errstate(over="ignore", invalid="ignore") if xp is np else contextlib.nullcontext()):
        if bool(xp.isfinite(array.sum(dtype=accumulator))):
            return True
        return bool(xp.isfinite(array).all())


def check_finite(array, message) -> None:
    """FloatingPointError(message) when finite checks are on and `array` holds NaN or inf (see all_finite).

    message: a string, or a function returning one (built only when the check fails)."""
    if _finite_checks.get() and not all_finite(array):
        raise FloatingPointError(message() if callable(message) else message)


def require_finite_array(array, argument: str, op: str, allow_inf: bool = False) -> None:
    """FloatingPointError naming `argument` when a floating `array` holds NaN (or ±inf, unless allow_inf).

    For weights entering a model (load_state_dict, parameter assignment); always on: it runs once per load,
    not per step. Non-floating arrays pass."""
    if getattr(array, "dtype", None) is None or array.dtype.kind not in "fc":
        return
    xp = array_module(array)
    if allow_inf:
        bad = bool(xp.isnan(array).any())
    else:
        bad = not all_finite(array)
    if bad:
        count = int(xp.count_nonzero(~xp.isfinite(array) if not allow_inf else xp.isnan(array)))
        what = "NaN" if allow_inf else "NaN or inf"
        raise FloatingPointError(f"{op}: {argument} holds {count} {what} value(s) of {array.size}; "
                                 "weights must be finite (was the checkpoint written after a diverged step?)")
