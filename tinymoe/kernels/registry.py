"""Which implementation runs each dispatch primitive.

Implementations are modules exposing one function per primitive (see `PRIMITIVES`):
  "numpy": `tinymoe.kernels.reference`, written with `xp` only, so it runs on NumPy and CuPy arrays; always there.
  "numba": `tinymoe.kernels.numba_cpu`, parallel Numba loops for CPU arrays; registered when numba imports.
  "cupy":  `tinymoe.kernels.cuda`, CuPy RawKernels for GPU arrays; registered when CuPy sees a device.
`register(name, module, device)` adds another (a test's spy, an experiment); `unregister(name)` removes it.

The choice comes from `TINYMOE_KERNELS=auto|numpy|numba|cupy` (read at import, checked at first use) or
`use(name)`; "auto" takes the fastest implementation available for the device of the data: Numba on the CPU,
CuPy on the GPU. Like `no_grad`, the choice lives in a `contextvars.ContextVar`: `with use(...)` changes it
for one thread or async task and restores it on exit, and a plain `use(...)` call keeps it for the rest of
that thread (other threads keep TINYMOE_KERNELS). Functions look their implementation up once, in forward,
and keep it on `ctx` for backward, so a backward run outside the `with` block uses the forward's kernels.
"""
from __future__ import annotations

import contextvars
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
CHOICES = ("auto", "numpy", "numba", "cupy")  # the built-in choices; `choices()` adds registered ones

_MODULES = {"numpy": "tinymoe.kernels.reference", "numba": "tinymoe.kernels.numba_cpu", "cupy": "tinymoe.kernels.cuda"}
_DEVICE_OF_IMPLEMENTATION = {"numpy": None, "numba": "cpu", "cupy": "cuda"}  # None: any device
_loaded = {}
_registered = {}  # name -> (module, device or None), added by `register`

_ENVIRONMENT_VALUE = os.environ.get("TINYMOE_KERNELS", "auto")
_choice = contextvars.ContextVar("tinymoe_kernels", default=None)  # None: TINYMOE_KERNELS decides


def choices() -> tuple:
    """Every name `use` accepts: the built-in ones and those added with `register`."""
    return CHOICES + tuple(_registered)


def _normalize(name) -> str:
    return str(name).strip().lower() or "auto"


def _check_choice(name, source: str = "kernel implementation") -> str:
    if name not in choices():
        raise ValueError(f"{source} {name!r} is unknown; expected one of {', '.join(choices())}")
    return name


def environment_problem() -> str | None:
    """Why TINYMOE_KERNELS cannot be used (a one-line message), or None when it is fine or unset."""
    value = _normalize(_ENVIRONMENT_VALUE)
    if value in choices():
        return None
    return (f"TINYMOE_KERNELS={_ENVIRONMENT_VALUE!r} is not a kernel implementation; "
            f"expected one of {', '.join(choices())}")


def register(name: str, module, device: str | None = None) -> None:
    """Make `module` (one function per primitive of `PRIMITIVES`) selectable as `use(name)`.

    device: "cpu" or "cuda" when it runs on one device's arrays only; None when it runs on any (like "numpy").
    For tests and experiments: "auto" never picks a registered implementation.
    """
    name = _normalize(name)
    if name in CHOICES:
        raise ValueError(f"register: {name!r} is a built-in implementation; pick another name")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"register: device={device!r} must be 'cpu', 'cuda' or None (any device)")
    missing = [primitive for primitive in PRIMITIVES if not callable(getattr(module, primitive, None))]
    if missing:
        raise TypeError(f"register: implementation {name!r} lacks the primitives {', '.join(missing)}")
    _registered[name] = (module, device)


def unregister(name: str) -> None:
    """Remove an implementation added with `register` (KeyError if there is none by that name)."""
    name = _normalize(name)
    if name not in _registered:
        raise KeyError(f"unregister: no registered kernel implementation {name!r}; registered: {list(_registered)}")
    del _registered[name]


def _device_of_implementation(name: str):
    return _registered[name][1] if name in _registered else _DEVICE_OF_IMPLEMENTATION[name]


def _load(name: str):
    """Import an implementation's module, with a clear error when its package is missing."""
    if name in _registered:
        return _registered[name][0]
    if name not in _loaded:
        if name == "numba":
            import_numba()
        elif name == "cupy":
            import_cupy()
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def is_available(name: str, device: str) -> bool:
    """Whether implementation `name` can run on arrays of `device` here."""
    runs_on = _device_of_implementation(name)
    if runs_on is not None and runs_on != device:
        return False
    try:
        _load(name)
    except BackendUnavailableError:
        return False
    return True


def available(device: str = "cpu") -> list:
    """Names of the implementations that run on `device` ("cpu" or "cuda") on this machine."""
    return [name for name in choices()[1:] if is_available(name, device)]


def current() -> str:
    """The forced implementation, or "auto". ValueError if it comes from a TINYMOE_KERNELS naming none."""
    name = _choice.get()
    if name is None:
        problem = environment_problem()
        if problem is not None:
            raise ValueError(problem)
        name = _normalize(_ENVIRONMENT_VALUE)
    return name


def chosen(device: str = "cpu") -> str:
    """The implementation that runs on `device` under the current choice."""
    name = current()
    if name != "auto":
        return name
    fastest = "numba" if device == "cpu" else "cupy"
    return fastest if is_available(fastest, device) else "numpy"


class use:
    """Force one implementation: `kernels.use("numba")` for the rest of this thread, or scoped:

        with tinymoe.kernels.use("numpy"):
            y = moe(x)
            y.sum().backward()   # also fine outside the block: backward uses the forward's kernels
    """

    def __init__(self, name: str):
        name = _check_choice(_normalize(name))
        if name != "auto":
            _load(name)  # fail now, with the package to install, not at the first call
        self._token = _choice.set(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        _choice.reset(self._token)
        return False


def implementation(array, name: str = None):
    """The module of implementation `name` (default: the current choice) for arrays like `array`.

    Functions call this once in forward and keep the module on `ctx` for their backward.
    """
    device = device_of(array)
    name = chosen(device) if name is None else _check_choice(_normalize(name))
    runs_on = _device_of_implementation(name)
    if runs_on is not None and runs_on != device:
        raise ValueError(
            f"kernel implementation {name!r} runs on {runs_on!r} arrays, but the data is on "
            f"{device!r}; use 'auto' or one of {available(device)}"
        )
    return _load(name)


def kernel(primitive: str, array):
    """The function implementing `primitive` for arrays like `array` under the current choice."""
    if primitive not in PRIMITIVES:
        raise ValueError(f"unknown dispatch primitive {primitive!r}; expected one of {PRIMITIVES}")
    return getattr(implementation(array), primitive)
