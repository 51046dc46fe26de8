"""Parameter initialisers, and the memory check every layer runs before allocating its parameters.

Values are drawn on the host from a NumPy Generator, so a seed gives the same weights on every device; then
cast to `dtype` and moved to `device`."""
from __future__ import annotations

import math
import sys

import numpy as np

from ..engine.backend import normalize_dtype
from ..engine.random import as_generator
from ..engine.tensor import tensor
from .module import Parameter

MEMINFO = "/proc/meminfo"


def available_memory() -> int | None:
    """Bytes the host can still allocate (Linux: MemAvailable of /proc/meminfo); None where unknown."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(MEMINFO) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def parameter_bytes(shapes, dtype) -> int:
    """Bytes of parameters of these shapes in `dtype` (Python ints: no overflow for absurd sizes)."""
    return sum(math.prod(shape) for shape in shapes) * np.dtype(dtype).itemsize


def require_memory(op: str, shapes: dict, dtype, sizes: dict, device: str = "cpu") -> None:
    """MemoryError, before anything is allocated, when the parameters of `op` cannot fit in the host's memory.

    shapes: parameter name -> shape; sizes: the constructor arguments (name -> value) the shapes come from,
    named in the message, the largest first. Host memory holds the parameters on "cpu"; on every device the
    initialiser also draws the largest parameter in float64 on the host first. Skipped where the available
    memory is unknown (not Linux).
    """
    dtype = normalize_dtype(dtype, "cuda")
    resident = parameter_bytes(shapes.values(), dtype) if device == "cpu" else 0
    drawn = 8 * max(math.prod(shape) for shape in shapes.values())
    available = available_memory()
    if available is None or resident + drawn <= available:
        return
    listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
    ordered = sorted(sizes.items(), key=lambda item: -item[1])
    arguments = ", ".join(f"{name}={value}" for name, value in ordered)
    raise MemoryError(
        f"{op}: {arguments} ask for {resident + drawn:.3g} bytes ({listed} in {dtype.name} on {device}: "
        f"{resident:.3g} host bytes, + {drawn:.3g} to draw the largest in float64) but this machine has "
        f"{available:.3g} bytes available (MemAvailable); reduce {ordered[0][0]}={ordered[0][1]}"
    )


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
