"""Scaled dot-product attention (Vaswani et al. 2017) as one Function with a hand-written backward.

    S = scale · Q Kᵀ (masked),  P = softmax(S, -1),  O = P V
    dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ⊙ (dP − rowsum(dP ⊙ P));  dQ = scale · dS K;  dK = scale · dSᵀ Q

Causal masking is aligned to the end of the keys: query i (of Lq) may attend key j (of Lk) when
j <= i + (Lk − Lq). With Lq == Lk this is the usual lower triangle (torch's is_causal); with Lq < Lk the
queries are the last Lq positions of the sequence (decoding with a KV cache). torch's is_causal aligns to
the start instead, which differs only when Lq != Lk. A query that may attend no key (Lq > Lk, first rows)
gets a zero output and zero gradient rather than NaN.
"""
from __future__ import annotations

import math

import numpy as np

from ..engine.array_math import softmax_in_place
from ..engine.basic_ops import unbroadcast
from ..engine.checks import require_bool, require_number, require_same_dtype, require_tensor
from ..engine.function import Function
from ..engine.tensor import Tensor


def _causal_mask(xp, query_len: int, key_len: int):
    """(Lq, Lk) bool: True where query i may attend key j, i.e. j <= i + (Lk − Lq)."""
    last_visible_key = xp.arange(query_len)[:, None] + (key_len - query_len)
    return xp.arange(key_len)[None, :] <= last_visible_key


_HIDDEN_KEYS = {}  # (array module, device id, Lq, Lk) -> read-only (Lq, Lk) bool, True where a key is hidden
_HIDDEN_KEYS_KEPT = 64  # training uses one shape; decoding with a KV cache one per length: bounded


def _hidden_keys(xp, query_len: int, key_len: int):
    """~_causal_mask, made once per (module, device, Lq, Lk) and reused: every step of training has one shape."""
    device = None if xp is np else xp.cuda.Device().id
    key = (xp.__name__, device, query_len, key_len)
    hidden = _HIDDEN_KEYS.get(key)
    if hidden is None:
        hidden = ~_causal_mask(xp, query_len, key_len)
        if xp is np:
            hidden.flags.writeable = False  # shared by every call: nobody may write into it
        if len(_HIDDEN_KEYS) >= _HIDDEN_KEYS_KEPT:
            _HIDDEN_KEYS.clear()
        _HIDDEN_KEYS[key] = hidden
    return hidden


class ScaledDotProductAttention(Function):
    """O = softmax(scale · Q Kᵀ [+ causal mask]) V.  q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv) -> (..., Lq, Dv)

    Backward: see the module docstring. Batch axes broadcast; their gradients are un-broadcast. The (..., Lq, Lk)
    scores and their gradient are each one buffer, scaled, masked, normalized and differentiated in place.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        xp = ctx.xp
        scores = q @ k.swapaxes(-1, -2)
        scores *= scale
        if causal:
            xp.copyto(scores, -xp.inf, where=_hidden_keys(xp, q.shape[-2], k.shape[-2]))
        probs = softmax_in_place(scores)  # a query that sees no key gets P = 0
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return probs @ v

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[2]:
            grad_v = unbroadcast(probs.swapaxes(-1, -2) @ grad_out, v.shape)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_scores = grad_out @ v.swapaxes(-1, -2)  # dP, a fresh buffer that becomes dS
            # dS = P ⊙ (dP − rowsum(dP ⊙ P)): array_math.softmax_backward's formula, in place
            grad_scores -= (grad_scores * probs).sum(axis=-1, keepdims=True)
            grad_scores *= probs
            if ctx.needs_input_grad[0]:
                grad_q = grad_scores @ k
                grad_q *= ctx.scale
                grad_q = unbroadcast(grad_q, q.shape)
            if ctx.needs_input_grad[1]:
                grad_k = grad_scores.swapaxes(-1, -2) @ q
                grad_k *= ctx.scale
                grad_k = unbroadcast(grad_k, k.shape)
        return grad_q, grad_k, grad_v


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale=None) -> Tensor:
    """softmax(scale · q kᵀ) v with scale = 1/sqrt(D) by default; causal masking aligned to the end.

    q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv) -> (..., Lq, Dv); the batch axes (...) broadcast.
    """
    op = "scaled_dot_product_attention"
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        require_tensor(tensor, name, op)
        if tensor.ndim < 2:
            raise ValueError(f"{op}: {name} must have shape (..., L, D) with at least 2 axes, got shape {tensor.shape}")
    require_same_dtype(op, q=q, k=k, v=v)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k has shape {k.shape} but q has shape {q.shape}; their last axes (D) must match")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{op}: v has shape {v.shape} but k has shape {k.shape}; their key axes (Lk) must match")
    if k.shape[-2] == 0:
        raise ValueError(f"{op}: k has shape {k.shape}: there must be at least one key")
    try:
        np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"{op}: the batch axes of q {q.shape[:-2]}, k {k.shape[:-2]} and v {v.shape[:-2]} do not broadcast"
        ) from None
    causal = require_bool(causal, "causal", op)
    if scale is None:
        if q.shape[-1] == 0:
            raise ValueError(f"{op}: q has shape {q.shape}; the default scale 1/sqrt(D) needs D >= 1")
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        scale = require_number(scale, "scale", op)
    return ScaledDotProductAttention.apply(q, k, v, causal, scale)
