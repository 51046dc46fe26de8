"""Dispatch kernels: a NumPy/`xp` reference always, Numba on the CPU and CuPy RawKernels on the GPU when present.

    tinymoe.kernels.available("cpu")      # ['numpy', 'numba']
    with tinymoe.kernels.use("numpy"):    # force one (or set TINYMOE_KERNELS=numpy)
        ...
"""
from .plan import RoutingPlan
from .registry import (CHOICES, PRIMITIVES, available, choices, chosen, current, environment_problem, implementation,
                       is_available, kernel, register, unregister, use)

__all__ = ["CHOICES", "PRIMITIVES", "RoutingPlan", "available", "choices", "chosen", "current", "environment_problem",
           "implementation", "is_available", "kernel", "register", "unregister", "use"]
