"""Inverted dropout (Srivastava et al. 2014): zero each entry with probability p, scale the rest by 1/(1 − p),
so the expected output equals the input and evaluation needs no rescaling."""
from __future__ import annotations

import numpy as np

from ..engine.function import Function
from ..engine.random import as_generator, uniform
from ..engine.tensor import Tensor
from ..engine.checks import require_bool, require_number, require_tensor


class Dropout(Function):
    """y = x · m,  m = [u >= p] / (1 − p),  u ~ U[0, 1) per entry (m = 0 everywhere when p = 1);  dx = g · m"""

    @staticmethod
    def forward(ctx, x, p, generator):
        # Drawn in float64 whatever x's dtype, so one seed gives one mask for float32 and float64 alike.
        draws = uniform(generator, x.shape, ctx.xp, np.float64)
        scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
        mask = (draws >= p).astype(x.dtype) * scale
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask


def dropout(x: Tensor, p: float, training: bool = True, generator=None) -> Tensor:
    """Zero entries of x with probability p (0 <= p <= 1) and scale the kept ones by 1/(1 − p).

    Returns x itself when not training or p == 0. generator: None (fresh randomness), an int seed or a
    numpy.random.Generator; a seed reproduces the mask on every device.
    """
    require_tensor(x, "x", "dropout")
    p = require_number(p, "p", "dropout", low=0.0, high=1.0)
    training = require_bool(training, "training", "dropout")
    generator = as_generator(generator)
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p, generator)
