"""User data -> the array inside a new tensor: what `tinymoe.tensor` accepts, and the clear errors for the rest.

Accepted: real numbers (Python or NumPy; bools count as 0/1), nested lists of them, and NumPy or CuPy arrays of
a floating, integer or bool dtype. Refused with TypeError: strings (NumPy would parse '1.5'), complex numbers
(NumPy would drop the imaginary part), None and other objects (NumPy would make NaN), ragged lists. A finite
value that the target dtype cannot hold (1e300 in float32) raises OverflowError instead of becoming inf;
inf and NaN written by the user stay as they are.

`require_bool` is here, below Tensor, because Tensor's constructor checks `requires_grad` with it; everyone
else imports it from engine/checks.py with the other argument checks.
"""
from __future__ import annotations

import numbers

import numpy as np

from .backend import device_of, module_for_device, normalize_dtype, to_device

_KIND_NAMES = {"U": "strings", "S": "bytes", "c": "complex numbers", "M": "datetimes", "m": "timedeltas",
               "V": "raw records"}


def as_tensor_array(data, dtype, device: str, op: str = "tensor"):
    """A new array on `device` holding a copy of `data`, checked as the module docstring says.

    dtype: a dtype, or None for float32 unless `data` is a floating array (which keeps its own dtype).
    """
    given_dtype = getattr(data, "dtype", None)
    if dtype is None:
        dtype = given_dtype if given_dtype is not None and given_dtype.kind == "f" else np.float32
    dtype = normalize_dtype(dtype, device)
    source = _source_array(data, op)
    if device_of(source) != device:
        source = to_device(source, device)
    xp = module_for_device(device)
    with np.errstate(over="ignore"):  # an overflow is detected below, by comparing finiteness
        array = xp.array(source, dtype=dtype, copy=True)
    if _may_overflow(source.dtype, dtype):
        overflowed = xp.isinf(array) & xp.isfinite(source)
        if bool(overflowed.any()):  # one host sync on CUDA, only when the cast narrows
            first = source[overflowed].reshape(-1)[0].item()
            raise OverflowError(
                f"{op}: data holds {first!r}, which overflows dtype={dtype.name} (largest finite value "
                f"{float(np.finfo(dtype).max):g}); pass dtype='float64' or rescale the data"
            )
    return array


def require_bool(value, argument: str, op: str) -> bool:
    """`value` as a Python bool: True or False only (NumPy bools too); 'yes', 1 and None are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{op}: {argument}={_short(value)} must be a bool (True or False)")


def _source_array(data, op: str):
    """`data` as an array of its own module (Python data as NumPy), refusing what is not real numbers."""
    if isinstance(data, np.generic):
        array = np.asarray(data)
    elif hasattr(data, "dtype") and hasattr(data, "shape"):
        array = data  # a NumPy or CuPy array
    else:
        if isinstance(data, (str, bytes)):
            raise TypeError(f"{op}: data={_short(data)} is a string; expected real numbers (convert with float())")
        try:
            array = np.asarray(data)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{op}: data of type {type(data).__name__} is not a rectangular array of numbers: "
                            f"{error}") from None
    kind = array.dtype.kind
    if kind == "O":
        return _object_array_as_float(array, op)
    if kind not in "fiub":
        what = _KIND_NAMES.get(kind, f"{array.dtype} values")
        raise TypeError(f"{op}: data holds {what} ({_short(data)}); expected real numbers")
    return array


def _object_array_as_float(array: np.ndarray, op: str) -> np.ndarray:
    """Python ints too large for int64 are fine (as float64); None or any other object is refused."""
    for item in array.reshape(-1):
        if not isinstance(item, numbers.Real):
            raise TypeError(f"{op}: data holds {_short(item)} of type {type(item).__name__}; expected real numbers "
                            "(None is not a number: use float('nan') for a missing value)")
    with np.errstate(over="ignore"):
        try:
            return array.astype(np.float64)
        except OverflowError:
            raise OverflowError(f"{op}: data holds an integer too large for float64") from None


def _may_overflow(source: np.dtype, target: np.dtype) -> bool:
    """Whether casting `source` values to `target` can turn a finite value into inf."""
    if source.kind == "f":
        return source.itemsize > target.itemsize
    if source.kind in "iu":
        return float(np.iinfo(source).max) > float(np.finfo(target).max)
    return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
