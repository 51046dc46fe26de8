"""Which implementation runs each dispatch primitive.

Implementations are modules exposing one function per primitive (see `PRIMITIVES`):
  "numpy": `tinymoe.kernels.reference`, written with `xp` only, so it runs on NumPy and CuPy arrays; always there.
  "numba": `tinymoe.kernels.numba_cpu`, parallel Numba loops for CPU arrays; registered when numba imports.
  "cupy":  `tinymoe.kernels.cuda`, CuPy RawKernels for GPU arrays; registered when CuPy sees a device.

The choice comes from `TINYMOE_KERNELS=auto|numpy|numba|cupy` (read at import) or `use(name)`; "auto"
takes the fastest implementation available for the device of the data: Numba on the CPU, CuPy on the GPU.
"""
from __future__ import annotations

import importlib
import os

from ..engine.backend import BackendUnavailableError, device_of, import_cupy, import_numba

PRIMITIVES = (
    "routing_plan",          # expert ids -> RoutingPlan (counts, offsets, stable permutation, its inverse, capacity)
    "gather_rows",           # out[i] = scale[i] * x[index[i]]
    "combine_rows",          # out[t] = sum_j w[t, j] * y[index[t, j]], index -1 = nothing
    "combine_weights_grad",  # dw[t, j] = <g[t], y[index[t, j]]>
    "scatter_add_rows",      # out[n] = sum_{i: index[i] = n} values[i], deterministic
    "swiglu",                # silu(a) * b
    "swiglu_backward",       # (da, db, h) of h = silu(a) * b, one pass
)
CHOICES = ("auto", "numpy", "numba", "cupy")

_MODULES = {"numpy": "tinymoe.kernels.reference", "numba": "tinymoe.kernels.numba_cpu", "cupy": "tinymoe.kernels.cuda"}
_DEVICE_OF_IMPLEMENTATION = {"numba": "cpu", "cupy": "cuda"}
_loaded = {}


def _check_choice(name, source: str = "kernel implementation") -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} {name!r} is unknown; expected one of {', '.join(CHOICES)}")
    return name


_choice = _check_choice(os.environ.get("TINYMOE_KERNELS", "auto").strip().lower() or "auto", "TINYMOE_KERNELS=")


def _load(name: str):
    """Import an implementation's module, with a clear error when its package is missing."""
    if name not in _loaded:
        if name == "numba":
            import_numba()
        elif name == "cupy":
            import_cupy()
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def is_available(name: str, device: str) -> bool:
    """Whether implementation `name` can run on arrays of `device` here."""
    if name == "numpy":
        return True
    if _DEVICE_OF_IMPLEMENTATION[name] != device:
        return False
    try:
        _load(name)
    except BackendUnavailableError:
        return False
    return True


def available(device: str = "cpu") -> list:
    """Names of the implementations that run on `device` ("cpu" or "cuda") on this machine."""
    return [name for name in ("numpy", "numba", "cupy") if is_available(name, device)]


def current() -> str:
    """The forced implementation, or "auto"."""
    return _choice


def chosen(device: str = "cpu") -> str:
    """The implementation that runs on `device` under the current choice."""
    if _choice != "auto":
        return _choice
    fastest = "numba" if device == "cpu" else "cupy"
    return fastest if is_available(fastest, device) else "numpy"


class use:
    """Force one implementation: `kernels.use("numba")` for the rest of the program, or scoped:

        with tinymoe.kernels.use("numpy"):
            y = moe(x)
    """

    def __init__(self, name: str):
        global _choice
        name = _check_choice(str(name).strip().lower())
        if name != "auto" and name != "numpy":
            _load(name)  # fail now, with the package to install, not at the first call
        self._previous, _choice = _choice, name

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        global _choice
        _choice = self._previous
        return False


def implementation(array, name: str = None):
    """The module of implementation `name` (default: the current choice) for arrays like `array`."""
    device = device_of(array)
    name = chosen(device) if name is None else _check_choice(name)
    if name != "numpy" and _DEVICE_OF_IMPLEMENTATION[name] != device:
        raise ValueError(
            f"kernel implementation {name!r} runs on {_DEVICE_OF_IMPLEMENTATION[name]!r} arrays, but the data is on "
            f"{device!r}; use 'auto' or one of {available(device)}"
        )
    return _load(name)


def kernel(primitive: str, array):
    """The function implementing `primitive` for arrays like `array` under the current choice."""
    if primitive not in PRIMITIVES:
        raise ValueError(f"unknown dispatch primitive {primitive!r}; expected one of {PRIMITIVES}")
    return getattr(implementation(array), primitive)
