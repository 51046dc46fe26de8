"""Tensor constructors: zeros, ones, randn (N(0,1)), rand (U[0,1)). Shapes as ints or one tuple."""
from __future__ import annotations

from .backend import module_for_device, normalize_device, normalize_dtype
from .random import as_generator, standard_normal, uniform
from .tensor import Tensor


def _shape(shape) -> tuple:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    for size in shape:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"shape={shape!r}: every size must be a non-negative int")
    return tuple(shape)


def _module_and_dtype(dtype, device):
    device = normalize_device(device)
    return module_for_device(device), normalize_dtype(dtype, device)


def zeros(*shape, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    xp, dtype = _module_and_dtype(dtype, device)
    return Tensor(xp.zeros(_shape(shape), dtype=dtype), requires_grad=requires_grad)


def ones(*shape, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    xp, dtype = _module_and_dtype(dtype, device)
    return Tensor(xp.ones(_shape(shape), dtype=dtype), requires_grad=requires_grad)


def randn(*shape, generator=None, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    """Standard normal samples; `generator` is None, an int seed or a numpy.random.Generator."""
    xp, dtype = _module_and_dtype(dtype, device)
    data = standard_normal(as_generator(generator), _shape(shape), xp, dtype)
    return Tensor(data, requires_grad=requires_grad)


def rand(*shape, generator=None, dtype="float32", device="cpu", requires_grad=False) -> Tensor:
    """Uniform samples on [0, 1); `generator` is None, an int seed or a numpy.random.Generator."""
    xp, dtype = _module_and_dtype(dtype, device)
    data = uniform(as_generator(generator), _shape(shape), xp, dtype)
    return Tensor(data, requires_grad=requires_grad)
