"""Grouped-query attention (Ainslie et al. 2023) with a causal offset, a sliding window and attention sinks,
as one Function with a hand-written backward: the attention of Llama, Mixtral, Qwen, OLMoE, DeepSeek-V3
(whose value heads are narrower than its query/key heads) and GPT-OSS.

Query head h reads key/value head h // g, with g = Hq / Hkv (transformers' repeat_kv). Query i of Lq is the
token at absolute position p_i = Lk − Lq + i (the last Lq of the Lk keys: decoding with a KV cache) and may
see key j when

    j <= p_i                      (causal)
    j >  p_i − W                  (sliding window W: the last W positions, itself included; Mistral/GPT-OSS)

With sinks (GPT-OSS) each head h has a learned logit σ_h that joins the softmax's denominator but carries
no value, so a query may put weight on "nothing":

    S = scale · Q Kᵀ (masked to −inf),   P_ij = exp(S_ij) / (Σ_j' exp(S_ij') + exp(σ_h)),   O = P V

Backward (P̂ = the softmax over the keys and the sink column, whose value is 0):

    dV = Σ_g Pᵀ dO;   dP = dO Vᵀ;   r_i = Σ_j P_ij dP_ij;   dS = P ⊙ (dP − r)
    dσ_h = −Σ_{b,i} P_sink,bhi · r_bhi
    dQ = scale · dS K;   dK = scale · Σ_g dSᵀ Q

A query that sees no key (Lq > Lk, first rows) outputs zeros and passes no gradient (with sinks all its
weight sits on the sink, which has no value, so the output is zero again).
"""
from __future__ import annotations

import math

from ..engine import array_math
from ..engine.checks import require_int, require_number, require_same_dtype, require_tensor
from ..engine.function import Function
from ..engine.tensor import Tensor


def visible_keys(xp, query_len: int, key_len: int, causal: bool, sliding_window: int | None):
    """(Lq, Lk) bool: True where query i (at position Lk − Lq + i) may attend key j (module docstring)."""
    position = xp.arange(query_len)[:, None] + (key_len - query_len)
    key = xp.arange(key_len)[None, :]
    visible = key <= position if causal else xp.ones((query_len, key_len), dtype=bool)
    if sliding_window is not None:
        visible = visible & (key > position - sliding_window)
    return visible


def _sees_every_key(query_len: int, key_len: int, causal: bool, sliding_window: int | None) -> bool:
    """Whether every query sees every key: one query (a decoding step) at the last position, within its
    window; or no mask at all."""
    fits = sliding_window is None or sliding_window >= key_len
    return fits and (not causal or query_len == 1)


class GroupedQueryAttention(Function):
    """O = softmax(scale · Q Kᵀ, masked [, sinks]) V with q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv),
    sinks (Hq,) or absent -> (B, Hq, Lq, Dv). Backward: the module docstring."""

    fresh_gradients = True

    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, sliding_window, scale):
        xp = ctx.xp
        batch, query_heads, query_len, _ = q.shape
        kv_heads, key_len = k.shape[1], k.shape[2]
        group = query_heads // kv_heads
        q5 = q.reshape(batch, kv_heads, group, query_len, q.shape[-1])  # query head h = (h // g, h % g)
        scores = (q5 @ k[:, :, None].swapaxes(-1, -2)) * scale  # (B, Hkv, g, Lq, Lk)
        if sinks is None and _sees_every_key(query_len, key_len, causal, sliding_window):
            probs = array_math.softmax(scores, axis=-1)  # the masked formula below with nothing masked, bit for bit
            sink_probs = None
        elif sinks is None:
            visible = visible_keys(xp, query_len, key_len, causal, sliding_window)
            scores = xp.where(visible, scores, -xp.inf)
            sees_a_key = visible.any(axis=-1, keepdims=True)  # rows with no key get P = 0, not NaN
            probs = array_math.softmax(xp.where(sees_a_key, scores, 0), axis=-1) * sees_a_key
            sink_probs = None
        else:
            scores = xp.where(visible_keys(xp, query_len, key_len, causal, sliding_window), scores, -xp.inf)
            sink_logits = xp.broadcast_to(sinks.reshape(1, kv_heads, group, 1, 1), scores.shape[:-1] + (1,))
            with_sink = array_math.softmax(xp.concatenate([scores, sink_logits], axis=-1), axis=-1)
            probs, sink_probs = with_sink[..., :-1], with_sink[..., -1:]
        ctx.save_for_backward(q5, k, v, probs, sink_probs)
        ctx.scale, ctx.has_sinks = scale, sinks is not None
        out = probs @ v[:, :, None]  # (B, Hkv, g, Lq, Dv)
        return out.reshape(batch, query_heads, query_len, v.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        q5, k, v, probs, sink_probs = ctx.saved_tensors
        batch, kv_heads, group, query_len, head_dim = q5.shape
        grad_out = grad_out.reshape(batch, kv_heads, group, query_len, v.shape[-1])
        grad_v = (probs.swapaxes(-1, -2) @ grad_out).sum(axis=2)
        grad_probs = grad_out @ v[:, :, None].swapaxes(-1, -2)  # (B, Hkv, g, Lq, Lk)
        row_dot = (grad_probs * probs).sum(axis=-1, keepdims=True)
        grad_scores = probs * (grad_probs - row_dot)
        grad_q = ((grad_scores @ k[:, :, None]) * ctx.scale).reshape(batch, kv_heads * group, query_len, head_dim)
        grad_k = (grad_scores.swapaxes(-1, -2) @ q5).sum(axis=2) * ctx.scale
        if not ctx.has_sinks:
            return grad_q, grad_k, grad_v
        grad_sinks = -(sink_probs * row_dot).sum(axis=(0, 3, 4)).reshape(kv_heads * group)
        return grad_q, grad_k, grad_v, grad_sinks


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                            sliding_window: int | None = None, sinks: Tensor | None = None, scale=None) -> Tensor:
    """Attention of the decoder models tinymoe loads: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)
    -> (B, Hq, Lq, Dv), Hq a multiple of Hkv.

    causal: query i sits at position Lk − Lq + i and sees keys up to it. sliding_window: W >= 1, the query
    also sees only keys at positions > p − W (needs causal). sinks: (Hq,) per-head logits added to the
    softmax's denominator (GPT-OSS), with their own gradient. scale: default 1/sqrt(D).
    """
    op = "grouped_query_attention"
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        require_tensor(tensor, name, op, ndim=4)
    require_same_dtype(op, q=q, k=k, v=v)
    batch, query_heads, _, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"{op}: q {q.shape}, k {k.shape} and v {v.shape} must share the batch axis (0)")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{op}: k has shape {k.shape} but q has shape {q.shape}; their last axes (D) must match")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"{op}: v has shape {v.shape} but k has shape {k.shape}; heads and keys (axes 1, 2) must match")
    kv_heads = k.shape[1]
    if kv_heads == 0 or query_heads % kv_heads:
        raise ValueError(f"{op}: q has {query_heads} heads and k has {kv_heads}; Hq must be a positive multiple of Hkv")
    if k.shape[2] == 0:
        raise ValueError(f"{op}: k has shape {k.shape}: there must be at least one key")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal={causal!r} must be a bool")
    if sliding_window is not None:
        sliding_window = require_int(sliding_window, "sliding_window", op, low=1)
        if not causal:
            raise ValueError(f"{op}: sliding_window={sliding_window} needs causal=True (it counts keys before the query)")
    if sinks is not None:
        require_tensor(sinks, "sinks", op, ndim=1)
        require_same_dtype(op, q=q, sinks=sinks)
        if sinks.shape[0] != query_heads:
            raise ValueError(f"{op}: sinks has shape {sinks.shape}; expected ({query_heads},), one logit per query head")
    if scale is None:
        if head_dim == 0:
            raise ValueError(f"{op}: q has shape {q.shape}; the default scale 1/sqrt(D) needs D >= 1")
        scale = 1.0 / math.sqrt(head_dim)
    else:
        scale = require_number(scale, "scale", op)
    if sinks is None:
        return GroupedQueryAttention.apply(q, k, v, None, causal, sliding_window, scale)
    return GroupedQueryAttention.apply(q, k, v, sinks, causal, sliding_window, scale)
