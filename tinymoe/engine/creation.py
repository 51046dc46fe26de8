"""Tensor constructors: zeros, ones, randn (N(0,1)), rand (U[0,1)). Shapes as ints or one tuple."""
from __future__ import annotations

import numbers

from .backend import module_for_device, normalize_device, normalize_dtype
from .checks import require_bool
from .random import as_generator, standard_normal, uniform
from .tensor import Tensor


def _checked(op: str, shape, dtype, device, requires_grad):
    """(shape, array module, dtype, requires_grad) after checking every argument, before any work."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    for size in shape:  # ValueError for a size of the wrong type too, as before
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"{op}: shape={shape!r} holds {size!r}; every size must be a non-negative int")
    device = normalize_device(device)
    dtype = normalize_dtype(dtype, device)
    requires_grad = require_bool(requires_grad, "requires_grad", op)
    return tuple(int(size) for size in shape), module_for_device(device), dtype, requires_grad


def zeros(*shape, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    shape, xp, dtype, requires_grad = _checked("zeros", shape, dtype, device, requires_grad)
    return Tensor(xp.zeros(shape, dtype=dtype), requires_grad=requires_grad)


def ones(*shape, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    shape, xp, dtype, requires_grad = _checked("ones", shape, dtype, device, requires_grad)
    return Tensor(xp.ones(shape, dtype=dtype), requires_grad=requires_grad)


def randn(*shape, generator=None, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    """Standard normal samples; `generator` is None, an int seed or a numpy.random.Generator."""
    shape, xp, dtype, requires_grad = _checked("randn", shape, dtype, device, requires_grad)
    return Tensor(standard_normal(as_generator(generator), shape, xp, dtype), requires_grad=requires_grad)


def rand(*shape, generator=None, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    """Uniform samples on [0, 1); `generator` is None, an int seed or a numpy.random.Generator."""
    shape, xp, dtype, requires_grad = _checked("rand", shape, dtype, device, requires_grad)
    return Tensor(uniform(as_generator(generator), shape, xp, dtype), requires_grad=requires_grad)
