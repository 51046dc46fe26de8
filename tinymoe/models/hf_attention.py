"""`HFAttention`: the self-attention of the transformers decoders tinymoe loads (Llama, Qwen2/3, Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS), built from tinymoe's ops, for one `HFModelSpec` layer (DeepSeek-V3's
multi-head latent attention is hf_mla.py).

    q, k, v = x Wqᵀ (+ bq), x Wkᵀ (+ bk), x Wvᵀ (+ bv)      Hq·D, Hkv·D, Hkv·D features
    q, k    = RMSNorm(q), RMSNorm(k)      qk_norm="all": over the whole projection (OLMoE), before the head split
                                         qk_norm="head": over each head's D features (Qwen3, Qwen3-MoE)
    q, k    = RoPE(q, p), RoPE(k, p)      positions p (offset by the cached length when decoding)
    o       = softmax(scale · q kᵀ, causal [, window W] [, sink σ_h]) v  query head h reads kv head h // (Hq/Hkv)
              GPT-OSS: window W on its "sliding_attention" layers, and a learned sink logit σ_h per query head
              (`sinks`, (Hq,)) in the softmax's denominator
    y       = o Woᵀ (+ bo)

References: GQA (Ainslie et al. 2023), RoPE (Su et al. 2021), QK-norm (Dehghani et al. 2023; OLMoE, Qwen3),
attention sinks (Xiao et al. 2023; GPT-OSS, OpenAI 2025).
Every op here (linear, rms_norm, apply_rotary, grouped_query_attention) has its backward beside its forward.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..engine.backend import array_module
from ..engine.function import Context
from ..functional.grouped_attention import GroupedQueryAttention, grouped_query_attention
from ..functional.linear import Linear as LinearOp
from ..functional.norms import RMSNorm as RMSNormOp
from ..functional.rotary import RotaryEmbedding, apply_rotary, rotary_frequencies
from ..nn import Linear, Module, RMSNorm, init
from .hf_config import HFModelSpec

class DecodingArrays(NamedTuple):
    """What `HFAttention.forward_arrays` reads (see `HFAttention.decoding_arrays`)."""
    projections: tuple          # ((weight, bias or None) of q, k, v): the parameters' own arrays
    qkv_weight: object          # [W_q; W_k; W_v] (Hq·D + 2·Hkv·D, hidden), a copy, or None (not stacked)
    qkv_bias: object            # [b_q; b_k; b_v] or None
    widths: tuple               # (Hq·D, Hkv·D, Hkv·Dv): where q, k and v sit in the stacked output
    o_weight: object
    o_bias: object
    q_norm: object              # (weight, eps) or None
    k_norm: object
    head_norm: object           # per-head norms stacked: (weight (Hq + Hkv, D), eps), or None
    sinks: object               # (Hq,) or None


# q|k|v are stacked for decoding only while the copy is small: it pays where one projection is too small for
# OpenBLAS to spread over its threads (and a large model's copy would cost memory and time per decoding).
MAX_STACKED_QKV = 1 << 22


# The model_types whose attention HFAttention computes (DeepSeek-V3's MLA is hf_mla.MultiHeadLatentAttention).
ATTENTION_TYPES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")


class HFAttention(Module):
    """Self-attention of layer `layer` of `spec`: x (B, L, hidden) -> (B, L, hidden).

    Sub-modules and parameters carry transformers' names: q_proj, k_proj, v_proj, o_proj (Linear, weight
    (out, in)), q_norm / k_norm (RMSNorm) when spec.qk_norm is set, sinks (Hq,) when spec.attention_sinks.
    """

    def __init__(self, spec: HFModelSpec, layer: int, dtype="float32", device="cpu", generator=None):
        super().__init__()
        if spec.model_type not in ATTENTION_TYPES:
            raise NotImplementedError(f"HFAttention: model_type={spec.model_type!r} is not implemented "
                                      f"(supported: {ATTENTION_TYPES})")
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale, self.qk_norm, self.rope_layout = spec.attention_scale, spec.qk_norm, spec.rope_layout
        sliding = spec.layer_types[layer] == "sliding_attention"
        self.sliding_window = spec.sliding_window if sliding else None
        hidden, q_width, kv_width = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        options = dict(dtype=dtype, device=device, generator=generator)
        self.q_proj = Linear(hidden, q_width, bias=spec.qkv_bias, **options)
        self.k_proj = Linear(hidden, kv_width, bias=spec.qkv_bias, **options)
        self.v_proj = Linear(hidden, kv_width, bias=spec.qkv_bias, **options)
        self.o_proj = Linear(q_width, hidden, bias=spec.out_bias, **options)
        if spec.qk_norm is not None:
            per_head = spec.qk_norm == "head"
            self.q_norm = RMSNorm(spec.head_dim if per_head else q_width, eps=spec.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(spec.head_dim if per_head else kv_width, eps=spec.rms_norm_eps, dtype=dtype, device=device)
        if spec.attention_sinks:  # zeros: every head starts as plain softmax plus one "null" key of logit 0
            self.sinks = init.constant((spec.num_heads,), 0.0, dtype, device)
        self.inv_freq, self.rope_scaling = rotary_frequencies(spec.rotary_dim, spec.rope_theta, spec.rope_scaling,
                                                              spec.max_position_embeddings)
        self.rotary_dim = spec.rotary_dim

    def _heads(self, projected, heads, norm):
        """(B, L, heads·D) -> (B, heads, L, D), with the per-head RMSNorm when qk_norm == "head"."""
        batch, length, _ = projected.shape
        split = projected.reshape(batch, length, heads, self.head_dim)
        if norm is not None:
            split = norm(split)
        return split.transpose(0, 2, 1, 3)

    def forward(self, x, positions, cache=None):
        """x (B, L, hidden); positions: ints (L,) or (B, L), the absolute position of each token; cache: a KVCache
        (this layer's keys and values are appended to it and attention reads all of them) or None."""
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        per_head = self.qk_norm == "head"
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = self._heads(q, self.num_heads, self.q_norm if per_head else None)
        k = self._heads(k, self.num_kv_heads, self.k_norm if per_head else None)
        v = self._heads(v, self.num_kv_heads, None)
        rope = dict(inv_freq=self.inv_freq, attention_scaling=self.rope_scaling, layout=self.rope_layout,
                    rotary_dim=self.rotary_dim)
        q, k = apply_rotary(q, positions, **rope), apply_rotary(k, positions, **rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        attended = grouped_query_attention(q, k, v, causal=True, sliding_window=self.sliding_window,
                                           sinks=getattr(self, "sinks", None), scale=self.scale)
        return self.o_proj(attended.transpose(0, 2, 1, 3).reshape(batch, length, self.num_heads * self.head_dim))

    def decoding_arrays(self) -> "DecodingArrays":
        """The arrays `forward_arrays` reads, collected once per decoding (hf_decoding.layer_arrays).

        The stacked [W_q; W_k; W_v] is a copy (hidden·(Hq + 2 Hkv)·D numbers per layer; made when it has at
        most MAX_STACKED_QKV numbers and q, k, v all have a bias or none): one GEMV instead of three for a
        decoding step, each output still the same dot product (bit for bit), and OpenBLAS spreads a matrix of
        that size over its threads (on the 98M benchmark model 83 µs against 169 µs for the three, 2 cores).
        With per-head q/k norms of one eps, their weights are stacked per head (Hq + Hkv, D), so that one
        norm and one rotation cover a step's query and key heads together (the same arithmetic per element)."""
        def bias_of(linear):
            return None if linear.bias is None else linear.bias.data

        def norm(name):
            module = getattr(self, name, None) if self.qk_norm is not None else None
            return None if module is None else (module.weight.data, module.eps)
        sinks = getattr(self, "sinks", None)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        xp = array_module(self.q_proj.weight.data)
        biases = [bias_of(linear) for linear in projections]
        stack = (sum(linear.weight.size for linear in projections) <= MAX_STACKED_QKV
                 and len({bias is None for bias in biases}) == 1)
        weight = xp.concatenate([linear.weight.data for linear in projections]) if stack else None
        bias = xp.concatenate(biases) if stack and biases[0] is not None else None
        q_norm, k_norm = norm("q_norm"), norm("k_norm")
        head_norm = None
        if self.qk_norm == "head" and q_norm[1] == k_norm[1]:
            head_norm = (xp.concatenate([xp.broadcast_to(q_norm[0], (self.num_heads, self.head_dim)),
                                         xp.broadcast_to(k_norm[0], (self.num_kv_heads, self.head_dim))]), q_norm[1])
        return DecodingArrays(tuple((linear.weight.data, b) for linear, b in zip(projections, biases)), weight, bias,
                              tuple(linear.weight.shape[0] for linear in projections), self.o_proj.weight.data,
                              bias_of(self.o_proj), q_norm, k_norm, head_norm, None if sinks is None else sinks.data)

    def forward_arrays(self, x, rotation, cache, arrays=None):
        """`forward` on plain arrays for decoding under no_grad: the same ops' forwards (so the same values, bit
        for bit), without Tensors, graph, argument checks or module calls; a one-row step takes q, k and v
        from one stacked product and norms and rotates the query and key heads together (`decoding_arrays`).
        x (B, L, hidden); rotation: `rotary_tables(positions, dtype)` of the model's first layer (every
        layer's rope is the spec's); cache: a KVCache (required: this path is for cached decoding); arrays:
        `decoding_arrays()` (default: collected now)."""
        batch, length, _ = x.shape
        ctx = Context(np, (), False)
        arrays = self.decoding_arrays() if arrays is None else arrays
        q_width, k_width, _ = arrays.widths
        # One row: one stacked GEMV, each output the same dot product as in its own GEMV. More rows take the
        # three products of the regular forward (a GEMM of another width need not round the same).
        stacked = batch * length == 1 and arrays.qkv_weight is not None
        if stacked:
            qkv = LinearOp.forward(ctx, x, arrays.qkv_weight, arrays.qkv_bias)
            q, k, v = qkv[..., :q_width], qkv[..., q_width:q_width + k_width], qkv[..., q_width + k_width:]
        else:
            q, k, v = (LinearOp.forward(ctx, x, weight, bias) for weight, bias in arrays.projections)
        if self.qk_norm == "all":
            q, k = RMSNormOp.forward(ctx, q, *arrays.q_norm), RMSNormOp.forward(ctx, k, *arrays.k_norm)
        cos, sin = rotation
        if stacked and self.qk_norm != "all" and (self.qk_norm is None or arrays.head_norm is not None):
            heads = qkv[..., :q_width + k_width].reshape(batch, length, -1, self.head_dim)
            if arrays.head_norm is not None:
                heads = RMSNormOp.forward(ctx, heads, *arrays.head_norm)
            heads = RotaryEmbedding.forward(ctx, heads.transpose(0, 2, 1, 3), cos, sin, self.rope_layout,
                                            self.rotary_dim)
            q, k = heads[:, :self.num_heads], heads[:, self.num_heads:]
        else:
            q, k = (a.reshape(batch, length, -1, self.head_dim) for a in (q, k))
            if self.qk_norm == "head":
                q, k = RMSNormOp.forward(ctx, q, *arrays.q_norm), RMSNormOp.forward(ctx, k, *arrays.k_norm)
            q, k = (RotaryEmbedding.forward(ctx, a.transpose(0, 2, 1, 3), cos, sin, self.rope_layout, self.rotary_dim)
                    for a in (q, k))
        v = v.reshape(batch, length, -1, self.head_dim).transpose(0, 2, 1, 3)
        k, v = cache.append(self.layer, k, v)
        attended = GroupedQueryAttention.forward(ctx, q, k, v, arrays.sinks, True, self.sliding_window, self.scale)
        rows = attended.transpose(0, 2, 1, 3).reshape(batch, length, self.num_heads * self.head_dim)
        return LinearOp.forward(ctx, rows, arrays.o_weight, arrays.o_bias)

    def rotary_tables(self, positions, dtype):
        """(cos, sin) (1, 1, L, rotary_dim/2) of `apply_rotary` for positions (L,), cast to dtype."""
        angles = positions.astype(np.float64)[..., None] * np.asarray(self.inv_freq, dtype=np.float64)
        angles = angles.reshape(1, 1, len(positions), -1)
        return ((np.cos(angles) * self.rope_scaling).astype(dtype), (np.sin(angles) * self.rope_scaling).astype(dtype))

    def extra_repr(self):
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"qk_norm={self.qk_norm!r}, sliding_window={self.sliding_window}")


def positions_after(cached: int, length: int) -> np.ndarray:
    """The absolute positions (L,) of `length` tokens that follow `cached` cached ones."""
    return np.arange(cached, cached + length, dtype=np.int64)


__all__ = ["ATTENTION_TYPES", "HFAttention", "positions_after"]
