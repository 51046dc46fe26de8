"""Array backends: NumPy on "cpu", CuPy on "cuda".

The array module `xp` always comes from the data (`array_module(array)`), never from a global switch.
`import tinymoe` imports NumPy only; CuPy and Numba are imported the first time they are asked for,
and asking for a missing one raises `BackendUnavailableError` naming the package to install.
"""
from __future__ import annotations

import importlib
import sys

import numpy as np

DEVICES = ("cpu", "cuda")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class BackendUnavailableError(ImportError):
    """An optional backend (CuPy, Numba, a CUDA device) was asked for and is not there."""


_cupy_module = None  # set once CuPy has imported and shown a device (and the matmul precision is applied)
MATMUL_PRECISIONS = ("highest", "tf32")
_matmul_precision = "highest"


def import_optional(module: str, extra: str, purpose: str):
    """Import the optional package `module` (a dotted name such as "numba" or "mpi4py.MPI") when it is first
    asked for; Python keeps it in sys.modules, so later calls cost a lookup. When it is missing, raise
    BackendUnavailableError "<purpose>, which is not installed: pip install <extra>", e.g. purpose "the Numba
    kernels need numba", extra "'tinymoe[numba]'". Errors other than ImportError pass through unchanged."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise BackendUnavailableError(f"{purpose}, which is not installed: pip install {extra}") from error


def import_cupy():
    """Return the `cupy` module, importing it on first use; raise a clear error if it cannot be used."""
    global _cupy_module
    if _cupy_module is None:
        cupy = import_optional("cupy", "'tinymoe[cuda12]' (CUDA 12) or 'tinymoe[cuda13]' (CUDA 13)",
                               "device='cuda' needs CuPy")
        try:
            device_count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # CuPy raises its own CUDARuntimeError when no driver is present
            raise BackendUnavailableError(f"CuPy is installed but no CUDA device is usable: {error}") from error
        if device_count == 0:
            raise BackendUnavailableError("CuPy is installed but reports no CUDA device")
        _cupy_module = cupy
        _apply_matmul_precision(_cupy_linalg())
    return _cupy_module


def import_numba():
    """Return the `numba` module, importing it on first use; raise a clear error if it is missing."""
    return import_optional("numba", "'tinymoe[numba]'", "the Numba kernels need numba")


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import_cupy()
    except BackendUnavailableError:
        return False
    return True


def set_matmul_precision(precision: str) -> None:
    """How float32 matmuls run on CUDA: "highest" (full float32, the default) or "tf32" (TensorFloat-32 tensor
    cores, compute capability 8.0+: inputs rounded to 10 mantissa bits, ~1e-3 relative error, several times
    faster). float16/float64 and NumPy on the CPU (which has no TF32) are not affected."""
    global _matmul_precision
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"set_matmul_precision: precision={precision!r}; expected one of {MATMUL_PRECISIONS}")
    _matmul_precision = precision
    if _cupy_module is not None:
        _apply_matmul_precision(_cupy_linalg())


def get_matmul_precision() -> str:
    return _matmul_precision


def _cupy_linalg():
    """CuPy's matmul module, or None if this CuPy version lays it out differently."""
    try:
        return importlib.import_module("cupy._core._routines_linalg")
    except ImportError:
        return None


def _apply_matmul_precision(cupy_linalg) -> None:
    # CuPy keeps one cuBLAS compute type per dtype (its CUPY_TF32 variable only sets the first one it uses).
    if cupy_linalg is None or not hasattr(cupy_linalg, "set_compute_type"):
        if _matmul_precision == "tf32":
            raise BackendUnavailableError("set_matmul_precision('tf32'): this CuPy version has no "
                                          "cupy._core._routines_linalg.set_compute_type; set CUPY_TF32=1 instead")
        return
    compute_type = cupy_linalg.COMPUTE_TYPE_TF32 if _matmul_precision == "tf32" else cupy_linalg.COMPUTE_TYPE_DEFAULT
    cupy_linalg.set_compute_type(np.float32, compute_type)


def numba_available() -> bool:
    try:
        import_numba()
    except BackendUnavailableError:
        return False
    return True


def _is_cupy_array(array) -> bool:
    # Only look if CuPy was imported by someone: a NumPy-only program never pays for the import.
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(array, cupy.ndarray)


def array_module(array):
    """The module (`numpy` or `cupy`) that owns `array`; plain Python data counts as NumPy."""
    if _is_cupy_array(array):
        return sys.modules["cupy"]
    return np


def device_of(array) -> str:
    return "cuda" if _is_cupy_array(array) else "cpu"


def module_for_device(device: str):
    device = normalize_device(device)
    return import_cupy() if device == "cuda" else np


def normalize_device(device) -> str:
    """Accept "cpu", "cuda" or "cuda:0" (one GPU is supported); return "cpu" or "cuda"."""
    if device is None:
        return "cpu"
    if isinstance(device, str):
        name = device.strip().lower()
        if name in DEVICES:
            return name
        if name == "cuda:0":
            return "cuda"
    raise ValueError(f"device={device!r} is not supported; expected 'cpu' or 'cuda'")


def normalize_dtype(dtype, device: str = "cpu", argument: str = "dtype") -> np.dtype:
    """A floating dtype for tensors: float32, float64, or float16 on CUDA only."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"{argument}={dtype!r} is not a dtype; expected 'float32', 'float64' or 'float16'") from error
    if resolved not in FLOAT_DTYPES:
        raise TypeError(
            f"{argument}={resolved.name} is not supported: tensors hold float32, float64 or float16 (CUDA) data; "
            "integer indices are passed as plain arrays"
        )
    if resolved == np.float16 and device != "cuda":
        raise TypeError(f"{argument}=float16 is allowed only with device='cuda' (got device={device!r})")
    return resolved


def to_device(array, device: str):
    """Copy `array` to `device` ("cpu" or "cuda"); no copy when it is already there."""
    device = normalize_device(device)
    if device_of(array) == device:
        return array
    if device == "cuda":
        return import_cupy().asarray(array)
    return sys.modules["cupy"].asnumpy(array)


def to_numpy(array) -> np.ndarray:
    return to_device(array, "cpu") if _is_cupy_array(array) else np.asarray(array)
