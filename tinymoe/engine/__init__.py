"""The engine: arrays from a swappable backend, Tensors, Functions with hand-written backward, gradcheck."""
from . import basic_ops
from .autograd import is_grad_enabled, no_grad
from .backend import BackendUnavailableError, cuda_available, get_matmul_precision, numba_available, set_matmul_precision
from .creation import ones, rand, randn, zeros
from .function import Context, DeviceMismatchError, Function
from .gradcheck import GradcheckError, GradcheckReport, gradcheck
from .tensor import Tensor, bind_ops, tensor

bind_ops(basic_ops)  # Tensor's operators call these ops; see tensor.py's docstring for why it is done here

__all__ = [
    "BackendUnavailableError", "Context", "DeviceMismatchError", "Function", "GradcheckError", "Tensor",
    "cuda_available", "get_matmul_precision", "gradcheck", "GradcheckReport", "is_grad_enabled", "no_grad", "numba_available", "ones",
    "rand", "randn", "set_matmul_precision", "tensor", "zeros",
]
