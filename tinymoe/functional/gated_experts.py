"""Gated experts with biases, and GPT-OSS's clamped SwiGLU, as one op with a hand-written backward.

Rows [expert_offsets[e], expert_offsets[e+1]) of xs (M, d) belong to expert e (weights in torch layout):

    a = x w1[e]ᵀ + b1[e]     b = x w3[e]ᵀ + b3[e]     (gate and up, (n, ff); a bias may be absent)
    "swiglu":          h = silu(a) ⊙ b
    "swiglu_clamped":  a' = min(a, limit), b' = clip(b, −limit, limit), h = (b' + 1) ⊙ a'·σ(alpha·a')   (GPT-OSS)
    y = h w2[e]ᵀ + b2[e]

The plain bias-free SwiGLU stays on `experts.SwiGLUExperts` (the fast path); this op serves the layers that
need biases or the clamp. Clamp subgradient: the gradient passes where the value is inside the clamp,
boundary included (a ≤ limit, −limit ≤ b ≤ limit: torch.clamp's convention), and is 0 strictly outside.
"""
from __future__ import annotations

from ..engine.array_math import clamped_swiglu_with_derivative, swiglu_with_derivative
from ..engine.function import Function
from .experts import _blocks

GATED_KINDS = ("swiglu", "swiglu_clamped")


class GatedExperts(Function):
    """y[rows of e] = act(x w1[e]ᵀ + b1[e], x w3[e]ᵀ + b3[e]) w2[e]ᵀ + b2[e]; b1, b3, b2 may each be None.

    Backward per block, with dh = dy w2[e] and the slopes saved in forward:
    da = dh ⊙ ∂h/∂a;  db = dh ⊙ ∂h/∂b;  dw2 = dyᵀ h;  db2 = Σ_rows dy;  dw1 = daᵀ x;  db1 = Σ da;
    dw3 = dbᵀ x;  db3 = Σ db;  dx = da w1[e] + db w3[e]. Experts with no rows get zero gradients.
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, xs, w1, b1, w3, b3, w2, b2, offsets, activation, alpha, limit):
        xp = ctx.xp
        d_ff = w1.shape[1]
        hidden = xp.empty((xs.shape[0], d_ff), xs.dtype)
        gate_slope, up_slope = xp.empty_like(hidden), xp.empty_like(hidden)
        out = xp.empty((xs.shape[0], w2.shape[1]), xs.dtype)
        for expert, start, stop in _blocks(offsets):
            x_block = xs[start:stop]
            gate, up = x_block @ w1[expert].T, x_block @ w3[expert].T
            if b1 is not None:
                gate += b1[expert]
            if b3 is not None:
                up += b3[expert]
            if activation == "swiglu_clamped":
                values = clamped_swiglu_with_derivative(gate, up, alpha, limit)
            else:
                values = swiglu_with_derivative(gate, up)
            hidden[start:stop], gate_slope[start:stop], up_slope[start:stop] = values
            out[start:stop] = hidden[start:stop] @ w2[expert].T
            if b2 is not None:
                out[start:stop] += b2[expert]
        ctx.save_for_backward(xs, w1, w3, w2, hidden, gate_slope, up_slope)
        ctx.offsets, ctx.has_bias = offsets, (b1 is not None, b3 is not None, b2 is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        xs, w1, w3, w2, hidden, gate_slope, up_slope = ctx.saved_tensors
        n_experts, d_ff, d_model = w1.shape
        grad_w1, grad_w3, grad_w2 = xp.zeros_like(w1), xp.zeros_like(w3), xp.zeros_like(w2)
        grad_b1, grad_b3 = xp.zeros((n_experts, d_ff), xs.dtype), xp.zeros((n_experts, d_ff), xs.dtype)
        grad_b2 = xp.zeros((n_experts, d_model), xs.dtype)
        grad_xs = xp.zeros_like(xs)
        for expert, start, stop in _blocks(ctx.offsets):
            x_block, grad_block = xs[start:stop], grad[start:stop]
            grad_hidden = grad_block @ w2[expert]
            grad_gate, grad_up = grad_hidden * gate_slope[start:stop], grad_hidden * up_slope[start:stop]
            grad_w2[expert] = grad_block.T @ hidden[start:stop]
            grad_b2[expert] = grad_block.sum(axis=0)
            grad_w1[expert] = grad_gate.T @ x_block
            grad_b1[expert] = grad_gate.sum(axis=0)
            grad_w3[expert] = grad_up.T @ x_block
            grad_b3[expert] = grad_up.sum(axis=0)
            grad_xs[start:stop] = grad_gate @ w1[expert] + grad_up @ w3[expert]
        has_b1, has_b3, has_b2 = ctx.has_bias
        grads = [grad_xs, grad_w1] + ([grad_b1] if has_b1 else []) + [grad_w3] + ([grad_b3] if has_b3 else [])
        return tuple(grads + [grad_w2] + ([grad_b2] if has_b2 else []))


def gated_experts_unchecked(xs, w1, b1, w3, b3, w2, b2, expert_offsets, activation="swiglu", alpha=1.702,
                            limit=7.0):
    """GatedExperts without any check: xs (M, d); w1, w3 (E, ff, d); b1, b3 (E, ff) or None; w2 (E, d, ff);
    b2 (E, d) or None; expert_offsets host ints (E+1,); activation in GATED_KINDS → (M, d)."""
    return GatedExperts.apply(xs, w1, b1, w3, b3, w2, b2, expert_offsets, activation, alpha, limit)
