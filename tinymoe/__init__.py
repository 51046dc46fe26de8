"""tinymoe: a small Mixture-of-Experts engine over NumPy (CPU) and CuPy (GPU), every backward hand-written."""
from .engine import (
    BackendUnavailableError,
    Context,
    DeviceMismatchError,
    Function,
    GradcheckError,
    Tensor,
    cuda_available,
    get_matmul_precision,
    gradcheck,
    is_grad_enabled,
    no_grad,
    numba_available,
    ones,
    rand,
    randn,
    set_matmul_precision,
    tensor,
    zeros,
)

from .engine.checks import finite_checks, finite_checks_enabled, set_finite_checks  # noqa: E402
from . import distributed, functional, io, kernels, models, nn, optim, testing, train  # noqa: E402  (NumPy-only imports)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "Context", "DeviceMismatchError", "Function", "GradcheckError", "Tensor",
    "cuda_available", "finite_checks", "finite_checks_enabled", "get_matmul_precision", "gradcheck",
    "is_grad_enabled", "no_grad", "numba_available", "ones", "rand", "randn", "set_finite_checks",
    "set_matmul_precision", "tensor", "zeros", "distributed", "functional", "io", "kernels", "models", "nn", "optim", "testing",
    "train", "__version__",
]
