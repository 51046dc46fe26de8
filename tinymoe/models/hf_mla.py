"""`MultiHeadLatentAttention`: DeepSeek-V2/V3's multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2",
sec. 2.1) for one `HFModelSpec` layer, built from tinymoe's ops (each with its backward beside its forward).

Keys and values of all H heads come from one small latent per token; only a narrow rope part is positional:

    q            = q_b(RMSNorm(q_a(x)))   or q_proj(x) when q_lora_rank is None     (B, L, H·(n + r))
    [q_n | q_r]  = q per head, split n = qk_nope_head_dim, r = qk_rope_head_dim
    [c | k_r]    = kv_a_proj_with_mqa(x)                 latent c (kv_lora_rank), one shared k_r (r) per token
    c            = RMSNorm(c)                            kv_a_layernorm
    q_r, k_r     = RoPE(q_r, p), RoPE(k_r, p)            layout "interleaved" when rope_interleave (below)
    [k_n | v]    = kv_b_proj(c) per head                 n and v_head_dim features
    k            = [k_n | k_r]                           k_r broadcast to every head
    o            = softmax(scale · [q_n | q_r] kᵀ, causal) v,    y = o_proj(o)

scale = spec.attention_scale ((n + r)^-½ · mscale² under YaRN). The two low-rank norms use ε = 1e-6, as the
DeepSeek code's RMSNorm default (not rms_norm_eps).

Rope layout: with rope_interleave, transformers rotates the pairs (2i, 2i+1) and writes the results
de-interleaved ([even'; odd']); tinymoe's layout="interleaved" writes them back in place. The rope part only
enters q_r·k_r, and both sides are permuted alike, so the scores are the same.

KV cache: the cache holds what transformers' does, the compressed latent per token (keys slot: c (B, 1, L,
kv_lora_rank); values slot: rotated k_r (B, 1, L, r)), kv_lora_rank + r numbers per token and layer instead
of H·(n + r + v_head_dim). Each step re-expands every cached latent with kv_b_proj (simple and exact; the
"absorbed" form that folds kv_b_proj into q and o_proj is not implemented).
"""
from __future__ import annotations

from .. import functional as F
from ..engine.tensor import Tensor
from ..functional.grouped_attention import grouped_query_attention
from ..functional.rotary import apply_rotary, rotary_frequencies
from ..nn import Linear, Module, RMSNorm
from .hf_config import HFModelSpec

LOW_RANK_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, used by q_a_layernorm and kv_a_layernorm


class MultiHeadLatentAttention(Module):
    """MLA of layer `layer` of a deepseek_v3 `spec`: x (B, L, hidden) -> (B, L, hidden).

    Sub-modules carry transformers' names: q_proj, or q_a_proj / q_a_layernorm / q_b_proj; kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj (Linear weights (out, in); q_a_proj, kv_a_proj_with_mqa and o_proj have a
    bias when attention_bias).
    """

    def __init__(self, spec: HFModelSpec, layer: int, dtype="float32", device="cpu", generator=None):
        super().__init__()
        if spec.model_type != "deepseek_v3":
            raise NotImplementedError(f"MultiHeadLatentAttention: model_type={spec.model_type!r} has no latent "
                                      "attention (only 'deepseek_v3')")
        self.layer, self.num_heads = layer, spec.num_heads
        self.nope_dim, self.rope_dim, self.value_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.value_head_dim
        self.kv_lora_rank, self.q_lora_rank = spec.kv_lora_rank, spec.q_lora_rank
        self.scale, self.rope_layout = spec.attention_scale, spec.rope_layout
        hidden, heads, qk_dim = spec.hidden_size, spec.num_heads, spec.qk_nope_head_dim + spec.qk_rope_head_dim
        options = dict(dtype=dtype, device=device, generator=generator)
        if spec.q_lora_rank is None:
            self.q_proj = Linear(hidden, heads * qk_dim, bias=False, **options)
        else:
            self.q_a_proj = Linear(hidden, spec.q_lora_rank, bias=spec.qkv_bias, **options)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, eps=LOW_RANK_NORM_EPS, dtype=dtype, device=device)
            self.q_b_proj = Linear(spec.q_lora_rank, heads * qk_dim, bias=False, **options)
        self.kv_a_proj_with_mqa = Linear(hidden, spec.kv_lora_rank + self.rope_dim, bias=spec.qkv_bias, **options)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, eps=LOW_RANK_NORM_EPS, dtype=dtype, device=device)
        self.kv_b_proj = Linear(spec.kv_lora_rank, heads * (self.nope_dim + self.value_dim), bias=False, **options)
        self.o_proj = Linear(heads * self.value_dim, hidden, bias=spec.out_bias, **options)
        self.inv_freq, self.rope_scaling = rotary_frequencies(spec.rotary_dim, spec.rope_theta, spec.rope_scaling,
                                                              spec.max_position_embeddings)
        self.rotary_dim = spec.rotary_dim

    def _rope(self, x, positions):
        return apply_rotary(x, positions, self.inv_freq, attention_scaling=self.rope_scaling,
                            layout=self.rope_layout, rotary_dim=self.rotary_dim)

    def forward(self, x, positions, cache=None):
        """x (B, L, hidden); positions: ints (L,) or (B, L); cache: a KVCache (this layer's latents c and rotated
        k_r are appended and attention reads all of them) or None."""
        batch, length, _ = x.shape
        heads, nope, rope = self.num_heads, self.nope_dim, self.rope_dim
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(batch, length, heads, nope + rope).transpose(0, 2, 1, 3)            # (B, H, L, n + r)
        q = F.concatenate([q[..., :nope], self._rope(q[..., nope:], positions)], axis=-1)
        compressed = self.kv_a_proj_with_mqa(x)                                           # (B, L, c + r)
        latent = self.kv_a_layernorm(compressed[..., :self.kv_lora_rank]).reshape(batch, 1, length, -1)
        k_rope = self._rope(compressed[..., self.kv_lora_rank:].reshape(batch, 1, length, rope), positions)
        if cache is not None:
            latent, k_rope = cache.update(self.layer, latent, k_rope)
        keys_len = latent.shape[2]
        kv = self.kv_b_proj(latent.reshape(batch, keys_len, self.kv_lora_rank))
        kv = kv.reshape(batch, keys_len, heads, nope + self.value_dim).transpose(0, 2, 1, 3)  # (B, H, Lk, n + v)
        every_head = Tensor(x.xp.ones((1, heads, 1, 1), dtype=x.dtype))
        k = F.concatenate([kv[..., :nope], k_rope * every_head], axis=-1)                  # (B, H, Lk, n + r)
        attended = grouped_query_attention(q, k, kv[..., nope:], causal=True, scale=self.scale)  # (B, H, L, v)
        return self.o_proj(attended.transpose(0, 2, 1, 3).reshape(batch, length, heads * self.value_dim))

    def extra_repr(self):
        return (f"heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
                f"qk_nope={self.nope_dim}, qk_rope={self.rope_dim}, v_head_dim={self.value_dim}")


__all__ = ["LOW_RANK_NORM_EPS", "MultiHeadLatentAttention"]
