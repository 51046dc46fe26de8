"""Expert networks as ops: E feed-forward networks applied to the expert-sorted rows of a routing plan.

Rows [expert_offsets[e], expert_offsets[e+1]) of the dispatched buffer xs (M, d) belong to expert e, so each
expert is a few dense matmuls on one contiguous block (weights in torch layout: w1 (E, ff, d), w2 (E, d, ff)).

    SwiGLU (Shazeer 2020; Mixtral):  y = w2 · (silu(w1 · x) ⊙ (w3 · x))    swiglu_experts(xs, w1, w3, w2, offsets)
    MLP ("relu" | "gelu" | "silu"):   y = w2 · act(w1 · x + b1) + b2       mlp_experts(xs, w1, b1, w2, b2, offsets, act)

The public functions check shapes, dtypes and offsets; the `*_unchecked` entries take the same arguments and
check nothing (inputs trusted: they come from a RoutingPlan and an Experts module). The SwiGLU kernels are
looked up once in forward (`tinymoe.kernels`) and kept on `ctx` for backward.
"""
from __future__ import annotations

import numpy as np

from ..engine.array_math import ACTIVATIONS_WITH_DERIVATIVE
from ..engine.checks import describe, require_same_dtype, require_tensor
from ..engine.function import Function
from ..kernels.registry import implementation


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
        ctx.kernels = implementation(xs)
        swiglu = ctx.kernels.swiglu
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
        swiglu_backward = ctx.kernels.swiglu_backward
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


class MLPExperts(Function):
    """y[rows of e] = act(x w1[e]ᵀ + b1[e]) w2[e]ᵀ + b2[e], act from `array_math.ACTIVATIONS_WITH_DERIVATIVE`.

    Backward: dpre = (dy w2[e]) ⊙ act'(pre); dw2 = dyᵀ act(pre); db2 = Σ dy; dw1 = dpreᵀ x; db1 = Σ dpre;
    dx = dpre w1[e].
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, offsets, activation):
        xp = ctx.xp
        out = xp.empty((xs.shape[0], w2.shape[1]), xs.dtype)
        hidden = xp.empty((xs.shape[0], w1.shape[1]), xs.dtype)
        for expert, start, stop in _blocks(offsets):
            hidden[start:stop] = xs[start:stop] @ w1[expert].T + b1[expert]
        hidden, slopes = ACTIVATIONS_WITH_DERIVATIVE[activation](hidden)
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


# ----- unchecked entries: inputs trusted, they come from a RoutingPlan and an Experts module ---------------
def swiglu_experts_unchecked(xs, w1, w3, w2, expert_offsets):
    """`swiglu_experts` without any check (expert_offsets: host ints, like plan.expert_offsets_host)."""
    return SwiGLUExperts.apply(xs, w1, w3, w2, expert_offsets)


def mlp_experts_unchecked(xs, w1, b1, w2, b2, expert_offsets, activation):
    """`mlp_experts` without any check (expert_offsets: host ints, like plan.expert_offsets_host)."""
    return MLPExperts.apply(xs, w1, b1, w2, b2, expert_offsets, activation)


# ----- validated public functions ---------------------------------------------------------------------------
def _require_shape(tensor, argument, op, shape, meaning):
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{op}: {argument} must have shape {meaning} = {shape}, got {tensor.shape}")


def _check_offsets(expert_offsets, n_experts, n_rows, op) -> np.ndarray:
    """expert_offsets as host int64 (E+1,): starting at 0, non-decreasing, ending at the rows of xs."""
    if hasattr(expert_offsets, "device") and not isinstance(expert_offsets, np.ndarray):
        raise TypeError(f"{op}: expert_offsets must be host integers (a NumPy array or a sequence, like "
                        f"plan.expert_offsets_host), got {describe(expert_offsets)}")
    offsets = np.asarray(expert_offsets)
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"{op}: expert_offsets must hold integers, got {describe(expert_offsets)}")
    offsets = offsets.astype(np.int64)
    if offsets.shape != (n_experts + 1,):
        raise ValueError(f"{op}: expert_offsets must have E + 1 = {n_experts + 1} entries (one more than the "
                         f"experts of w1), got shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != n_rows:
        raise ValueError(f"{op}: expert_offsets must start at 0 and end at the rows of xs ({n_rows}), "
                         f"got {offsets[0]} ... {offsets[-1]}")
    steps = np.diff(offsets)
    if (steps < 0).any():
        e = int(np.nonzero(steps < 0)[0][0])
        raise ValueError(f"{op}: expert_offsets must be non-decreasing, got expert_offsets[{e}] = {offsets[e]} > "
                         f"expert_offsets[{e + 1}] = {offsets[e + 1]}")
    return offsets


def swiglu_experts(xs, w1, w3, w2, expert_offsets):
    """E SwiGLU experts on expert-sorted rows: y[r] = w2[e] (silu(w1[e] xs[r]) ⊙ w3[e] xs[r]) for r in e's block.

    xs Tensor (M, d); w1, w3 (E, ff, d); w2 (E, d, ff), all one dtype; expert_offsets host ints (E+1,), from 0
    to M, non-decreasing (a plan's `expert_offsets_host`) → (M, d).
    """
    op = "swiglu_experts"
    require_tensor(xs, "xs", op, ndim=2)
    for name, weight in (("w1", w1), ("w3", w3), ("w2", w2)):
        require_tensor(weight, name, op, ndim=3)
    require_same_dtype(op, xs=xs, w1=w1, w3=w3, w2=w2)
    n_experts, d_ff, d_model = w1.shape
    if xs.shape[1] != d_model:
        raise ValueError(f"{op}: xs has {xs.shape[1]} columns but w1 {w1.shape} takes d_model = {d_model}")
    _require_shape(w3, "w3", op, (n_experts, d_ff, d_model), "(E, ff, d) of w1")
    _require_shape(w2, "w2", op, (n_experts, d_model, d_ff), "(E, d, ff)")
    offsets = _check_offsets(expert_offsets, n_experts, xs.shape[0], op)
    return swiglu_experts_unchecked(xs, w1, w3, w2, offsets)


def mlp_experts(xs, w1, b1, w2, b2, expert_offsets, activation):
    """E two-layer experts on expert-sorted rows: y[r] = w2[e] act(w1[e] xs[r] + b1[e]) + b2[e] for r in e's block.

    xs Tensor (M, d); w1 (E, ff, d); b1 (E, ff); w2 (E, d, ff); b2 (E, d), all one dtype; expert_offsets host
    ints (E+1,), from 0 to M, non-decreasing; activation one of "relu", "gelu" (exact), "silu" → (M, d).
    """
    op = "mlp_experts"
    if activation not in ACTIVATIONS_WITH_DERIVATIVE:
        raise ValueError(f"{op}: activation={activation!r} is not supported; expected one of "
                         f"{tuple(ACTIVATIONS_WITH_DERIVATIVE)}")
    require_tensor(xs, "xs", op, ndim=2)
    for name, weight, ndim in (("w1", w1, 3), ("b1", b1, 2), ("w2", w2, 3), ("b2", b2, 2)):
        require_tensor(weight, name, op, ndim=ndim)
    require_same_dtype(op, xs=xs, w1=w1, b1=b1, w2=w2, b2=b2)
    n_experts, d_ff, d_model = w1.shape
    if xs.shape[1] != d_model:
        raise ValueError(f"{op}: xs has {xs.shape[1]} columns but w1 {w1.shape} takes d_model = {d_model}")
    _require_shape(b1, "b1", op, (n_experts, d_ff), "(E, ff)")
    _require_shape(w2, "w2", op, (n_experts, d_model, d_ff), "(E, d, ff)")
    _require_shape(b2, "b2", op, (n_experts, d_model), "(E, d)")
    offsets = _check_offsets(expert_offsets, n_experts, xs.shape[0], op)
    return mlp_experts_unchecked(xs, w1, b1, w2, b2, offsets, activation)
