"""Experts: E feed-forward networks applied to the expert-sorted rows of a routing plan.

Rows [offsets[e], offsets[e+1]) of the dispatched buffer xs (M, d) belong to expert e, so each expert is a
few dense matmuls on one contiguous block (weights in torch layout: w1 (E, ff, d), w2 (E, d, ff)).

    SwiGLU (Shazeer 2020; Mixtral):  y = w2 · (silu(w1 · x) ⊙ (w3 · x))
    MLP ("relu" | "gelu" | "silu"):   y = w2 · act(w1 · x + b1) + b2
"""
from __future__ import annotations

import math

from ..engine.array_math import normal_cdf, normal_pdf, sigmoid
from ..engine.checks import require_int
from ..engine.function import Function
from ..engine.random import as_generator
from ..kernels.registry import kernel
from . import init
from .module import Module

ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")


def _blocks(offsets):
    """(expert, start, stop) for every expert with at least one row."""
    for expert in range(len(offsets) - 1):
        start, stop = int(offsets[expert]), int(offsets[expert + 1])
        if stop > start:
            yield expert, start, stop


def _zero_idle(grads, offsets):
    """Zero the weight gradients of experts that got no rows (the others are overwritten whole)."""
    for expert in range(len(offsets) - 1):
        if int(offsets[expert + 1]) == int(offsets[expert]):
            for grad in grads:
                grad[expert] = 0


class SwiGLUExperts(Function):
    """y[rows of e] = (silu(x w1[e]ᵀ) ⊙ x w3[e]ᵀ) w2[e]ᵀ for each expert e.

    Works one expert block at a time and saves only a = x w1ᵀ and b = x w3ᵀ per block (none under no_grad);
    h = silu(a)⊙b comes back from the backward kernel's single pass over (a, b). Block-sized temporaries
    are also what the allocator can reuse from step to step (whole (M, ff) arrays are fresh pages each time).
    Backward per expert block, with dh = dy w2[e]:
    (da, db, h) = swiglu'(a, b; dh);  dw2[e] = dyᵀ h;  dw1[e] = daᵀ x;  dw3[e] = dbᵀ x;  dx = da w1[e] + db w3[e].
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, xs, w1, w3, w2, offsets):
        xp = ctx.xp
        swiglu = kernel("swiglu", xs)
        out = xp.empty((xs.shape[0], w2.shape[1]), xs.dtype)
        saved = []
        for expert, start, stop in _blocks(offsets):
            x_block = xs[start:stop]
            gate, up = x_block @ w1[expert].T, x_block @ w3[expert].T
            xp.matmul(swiglu(gate, up), w2[expert].T, out=out[start:stop])
            if ctx.requires_grad:
                saved.append((expert, start, stop, gate, up))
        ctx.save_for_backward(xs, w1, w3, w2, saved)
        ctx.offsets = offsets
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        xs, w1, w3, w2, saved = ctx.saved_tensors
        swiglu_backward = kernel("swiglu_backward", xs)
        grad_w1, grad_w3, grad_w2 = xp.empty_like(w1), xp.empty_like(w3), xp.empty_like(w2)
        _zero_idle((grad_w1, grad_w3, grad_w2), ctx.offsets)
        grad_xs = xp.empty_like(xs) if ctx.needs_input_grad[0] else None
        for expert, start, stop, gate, up in saved:
            x_block, grad_block = xs[start:stop], grad[start:stop]
            grad_gate, grad_up, activated = swiglu_backward(gate, up, grad_block @ w2[expert])
            xp.matmul(grad_block.T, activated, out=grad_w2[expert])
            xp.matmul(grad_gate.T, x_block, out=grad_w1[expert])
            xp.matmul(grad_up.T, x_block, out=grad_w3[expert])
            if grad_xs is not None:
                xp.matmul(grad_gate, w1[expert], out=grad_xs[start:stop])
                grad_xs[start:stop] += grad_up @ w3[expert]
        return grad_xs, grad_w1, grad_w3, grad_w2


def _activation(name, xp, pre):
    """(act(pre), act'(pre)) for the non-gated experts."""
    if name == "relu":
        return xp.maximum(pre, 0), (pre > 0).astype(pre.dtype)
    if name == "silu":
        sigma = sigmoid(pre)
        return pre * sigma, sigma * (1 + pre * (1 - sigma))
    cdf = normal_cdf(pre)  # exact GELU: x·Φ(x), derivative Φ(x) + x·φ(x)
    return pre * cdf, cdf + pre * normal_pdf(pre)


class MLPExperts(Function):
    """y[rows of e] = act(x w1[e]ᵀ + b1[e]) w2[e]ᵀ + b2[e].

    Backward: dpre = (dy w2[e]) ⊙ act'(pre); dw2 = dyᵀ act(pre); db2 = Σ dy; dw1 = dpreᵀ x; db1 = Σ dpre;
    dx = dpre w1[e].
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, offsets, activation):
        xp = ctx.xp
        out = xp.empty((xs.shape[0], w2.shape[1]), xs.dtype)
        hidden, slopes = xp.empty((xs.shape[0], w1.shape[1]), xs.dtype), None
        for expert, start, stop in _blocks(offsets):
            hidden[start:stop] = xs[start:stop] @ w1[expert].T + b1[expert]
        hidden, slopes = _activation(activation, xp, hidden)
        for expert, start, stop in _blocks(offsets):
            out[start:stop] = hidden[start:stop] @ w2[expert].T + b2[expert]
        ctx.save_for_backward(xs, w1, w2, hidden, slopes)
        ctx.offsets, ctx.bias_shapes = offsets, (b1.shape, b2.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        xs, w1, w2, hidden, slopes = ctx.saved_tensors
        grad_w1, grad_w2 = xp.zeros_like(w1), xp.zeros_like(w2)
        grad_b1, grad_b2 = xp.zeros(ctx.bias_shapes[0], xs.dtype), xp.zeros(ctx.bias_shapes[1], xs.dtype)
        grad_xs = xp.zeros_like(xs)
        for expert, start, stop in _blocks(ctx.offsets):
            grad_out = grad[start:stop]
            grad_w2[expert] = grad_out.T @ hidden[start:stop]
            grad_b2[expert] = grad_out.sum(axis=0)
            grad_pre = (grad_out @ w2[expert]) * slopes[start:stop]
            grad_w1[expert] = grad_pre.T @ xs[start:stop]
            grad_b1[expert] = grad_pre.sum(axis=0)
            grad_xs[start:stop] = grad_pre @ w1[expert]
        return grad_xs, grad_w1, grad_b1, grad_w2, grad_b2


class Experts(Module):
    """E independent FFN experts. Parameters: w1 (E, ff, d), w3 (E, ff, d; SwiGLU only), w2 (E, d, ff);
    b1 (E, ff) and b2 (E, d) for the non-gated activations. Initialised like torch Linear layers:
    U(±1/sqrt(d)) for w1, w3, b1 and U(±1/sqrt(ff)) for w2, b2.
    """

    def __init__(self, n_experts, d_model, d_ff, activation="swiglu", dtype="float32", device="cpu", generator=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}")
        self.n_experts = require_int(n_experts, "n_experts", "Experts", low=1)
        self.d_model = require_int(d_model, "d_model", "Experts", low=1)
        self.d_ff = require_int(d_ff, "d_ff", "Experts", low=1)
        self.activation = activation
        generator = as_generator(generator)
        in_bound, out_bound = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        shape_in, shape_out = (self.n_experts, self.d_ff, self.d_model), (self.n_experts, self.d_model, self.d_ff)
        self.w1 = init.uniform(shape_in, in_bound, generator, dtype, device)
        if activation == "swiglu":
            self.w3 = init.uniform(shape_in, in_bound, generator, dtype, device)
        else:
            self.b1 = init.uniform((self.n_experts, self.d_ff), in_bound, generator, dtype, device)
        self.w2 = init.uniform(shape_out, out_bound, generator, dtype, device)
        if activation != "swiglu":
            self.b2 = init.uniform((self.n_experts, self.d_model), out_bound, generator, dtype, device)

    def forward(self, xs, expert_offsets):
        """xs (M, d) sorted by expert; expert_offsets: host ints (E+1,) → (M, d)."""
        if self.activation == "swiglu":
            return SwiGLUExperts.apply(xs, self.w1, self.w3, self.w2, expert_offsets)
        return MLPExperts.apply(xs, self.w1, self.b1, self.w2, self.b2, expert_offsets, self.activation)

    def extra_repr(self):
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class SwiGLU(Module):
    """A dense SwiGLU feed-forward block, y = w2 (silu(w1 x) ⊙ w3 x), with w1, w3 (ff, d) and w2 (d, ff).

    Used for always-on shared experts (n shared experts of width ff are one block of width n·ff) and
    for dense layers. It runs as a single expert that owns every row.
    """

    def __init__(self, d_model, d_ff, dtype="float32", device="cpu", generator=None):
        super().__init__()
        self.d_model = require_int(d_model, "d_model", "SwiGLU", low=1)
        self.d_ff = require_int(d_ff, "d_ff", "SwiGLU", low=1)
        generator = as_generator(generator)
        in_bound, out_bound = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        self.w1 = init.uniform((self.d_ff, self.d_model), in_bound, generator, dtype, device)
        self.w3 = init.uniform((self.d_ff, self.d_model), in_bound, generator, dtype, device)
        self.w2 = init.uniform((self.d_model, self.d_ff), out_bound, generator, dtype, device)

    def forward(self, x):
        """x (..., d) → (..., d)."""
        rows = x.reshape(-1, self.d_model)
        offsets = (0, rows.shape[0])
        w1, w3 = self.w1.reshape(1, self.d_ff, self.d_model), self.w3.reshape(1, self.d_ff, self.d_model)
        out = SwiGLUExperts.apply(rows, w1, w3, self.w2.reshape(1, self.d_model, self.d_ff), offsets)
        return out.reshape(*x.shape)

    def extra_repr(self):
        return f"d_model={self.d_model}, d_ff={self.d_ff}"
