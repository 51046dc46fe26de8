"""Seedable randomness. Numbers are drawn on the host by a NumPy Generator, so one seed gives the same
values on every device and dtype; they are then cast and moved to the array module that needs them."""
from __future__ import annotations

import numbers

import numpy as np


def as_generator(generator=None, argument: str = "generator") -> np.random.Generator:
    """None: a fresh unseeded Generator; an int: a Generator seeded with it; a Generator: itself."""
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool) and int(generator) >= 0:
        return np.random.default_rng(int(generator))
    raise TypeError(f"{argument}={generator!r} is not a seed; expected None, a non-negative int or numpy.random.Generator")


def standard_normal(generator: np.random.Generator, shape, xp, dtype):
    """N(0, 1) samples of `shape`, as an array of `xp` with `dtype`."""
    return xp.asarray(generator.standard_normal(shape).astype(dtype, copy=False))


def uniform(generator: np.random.Generator, shape, xp, dtype, low: float = 0.0, high: float = 1.0):
    """U[low, high) samples of `shape`, as an array of `xp` with `dtype`."""
    samples = generator.uniform(low, high, shape).astype(dtype, copy=False)
    # float64 draws just below `high` can round up to it in a narrower dtype; keep the interval half-open.
    np.minimum(samples, np.nextafter(np.asarray(high, dtype), np.asarray(low, dtype)), out=samples)
    return xp.asarray(samples)
