"""Oracles shared by the Tensor tests: float64 operands where each binary op is smooth, and gradients of
<cotangent, fn(...)> by torch's autograd (independent) and by tinymoe (under test)."""
import operator

import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf

BINARY_OPS = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "pow": operator.pow,
}


def binary_operands(name, a_shape, b_shape, seed=0):
    """float64 operands where the op and its gradient are smooth: positive base for pow, |b| >= 0.5 for div."""
    rng = np.random.default_rng(seed)
    if name == "pow":
        return rng.uniform(0.5, 2.0, a_shape), rng.uniform(-2.0, 2.0, b_shape)
    a = rng.standard_normal(a_shape)
    if name == "div":
        return a, rng.choice([-1.0, 1.0], b_shape) * rng.uniform(0.5, 2.0, b_shape)
    return a, rng.standard_normal(b_shape)


def torch_grads(fn, arrays, cotangent):
    """Gradients of <cotangent, fn(*arrays)> computed by torch in float64 (an independent oracle)."""
    torch = pytest.importorskip("torch")
    leaves = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in arrays]
    out = fn(*leaves)
    out.backward(torch.tensor(np.asarray(cotangent, dtype=np.float64)))
    return [t.grad.numpy() for t in leaves]


def tm_grads(fn, arrays, cotangent, device="cpu"):
    leaves = [leaf(a, device=device) for a in arrays]
    out = fn(*leaves)
    out.backward(tm.tensor(cotangent, dtype="float64", device=device))
    return [host(t.grad) for t in leaves]
