"""Parameter initialisers. Values are drawn on the host from a NumPy Generator, so a seed gives the same
weights on every device; then cast to `dtype` and moved to `device`."""
from __future__ import annotations

import math

import numpy as np

from ..engine.random import as_generator
from ..engine.tensor import tensor
from .module import Parameter


def _parameter(values: np.ndarray, dtype, device) -> Parameter:
    return Parameter(tensor(values, dtype=dtype, device=device))


def uniform(shape, bound: float, generator=None, dtype="float32", device="cpu") -> Parameter:
    """U(−bound, bound)."""
    return _parameter(as_generator(generator).uniform(-bound, bound, shape), dtype, device)


def normal(shape, std: float, generator=None, dtype="float32", device="cpu") -> Parameter:
    """N(0, std²)."""
    return _parameter(as_generator(generator).standard_normal(shape) * std, dtype, device)


def constant(shape, value: float, dtype="float32", device="cpu") -> Parameter:
    return _parameter(np.full(shape, value), dtype, device)


def fan_in_bound(fan_in: int) -> float:
    """1/sqrt(fan_in): torch's default bound for Linear weights and biases."""
    return 1.0 / math.sqrt(fan_in)
