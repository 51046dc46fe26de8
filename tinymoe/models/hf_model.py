"""`HFCausalLM`: a transformers decoder checkpoint (Llama, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3, GPT-OSS) run on tinymoe's own layers, built from an `HFModelSpec`.

    h      = E[ids]                                         model.embed_tokens
    for each layer:
      h    = h + Attention(RMSNorm(h), positions)           input_layernorm, self_attn (hf_attention.py; GPT-OSS
                                                            with sinks; DeepSeek-V3: latent attention, hf_mla.py)
      h    = h + FFN(RMSNorm(h))                            post_attention_layernorm, mlp:
             dense SwiGLU  w2 (silu(w1 h) ⊙ w3 h)           (gate_proj = w1, up_proj = w3, down_proj = w2)
             or tm.nn.MoE with the type's MoEConfig options (`moe_options`): softmax top-k router, SwiGLU
             experts (Mixtral: renormalised top-k; Qwen2/3-MoE, OLMoE: renormalised when norm_topk_prob);
             Qwen2-MoE: + a shared expert scaled by σ(x·w); GPT-OSS: router bias, softmax over the top-k
             logits, clamped SwiGLU experts with biases; DeepSeek-V3: sigmoid scores + e_score_correction_bias
             for the choice among the topk_group best of n_group groups, weights s/Σs · routed_scaling_factor,
             + shared experts; its first first_k_dense_replace layers are dense
    logits = RMSNorm(h) Wᵀ                                  model.norm, lm_head (W = E when tied)

The module tree carries transformers' names down to the layer (model.layers.3.self_attn.q_proj.weight); the
feed-forward blocks hold tinymoe's parameters (SwiGLU w1/w3/w2, MoE router.weight / experts.w1 ...), mapped
onto checkpoint names by hf_checkpoint.py. Loading: `tinymoe.models.from_pretrained(directory)`.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..engine.autograd import is_grad_enabled
from ..engine.backend import normalize_device, normalize_dtype
from ..engine.random import as_generator
from ..engine.tensor import Tensor
from ..nn import Embedding, Linear, Module, ModuleList, MoE, RMSNorm, SwiGLU
from .generation import generate
from .hf_attention import ATTENTION_TYPES, HFAttention, positions_after
from .hf_checkpoint import save_pretrained
from .hf_config import HFModelSpec, parse_hf_config
from .hf_decoding import next_token_logits_arrays
from .hf_mla import MultiHeadLatentAttention
from .kv_cache import KVCache

# What tinymoe's layers lack for a model_type parse_hf_config knows (empty: every type runs).
NOT_IMPLEMENTED = {}
MODEL_TYPES = ATTENTION_TYPES + ("deepseek_v3",)


def require_supported(model_type: str) -> None:
    """NotImplementedError naming `model_type` and the missing feature for types tinymoe cannot run yet."""
    if model_type in NOT_IMPLEMENTED:
        raise NotImplementedError(f"model_type={model_type!r} is not implemented by tinymoe's HFCausalLM yet: it "
                                  f"needs {NOT_IMPLEMENTED[model_type]} (supported: {MODEL_TYPES})")
    if model_type not in MODEL_TYPES:
        raise NotImplementedError(f"model_type={model_type!r} is not supported (supported: {MODEL_TYPES})")


def moe_options(spec: HFModelSpec) -> dict:
    """The MoEConfig options (besides sizes, dtype and capacity) of the MoE layers of `spec`'s model_type."""
    options = dict(router="sigmoid" if spec.scoring_func == "sigmoid" else "softmax",
                   normalize_top_k=spec.model_type in ("mixtral", "gpt_oss") or bool(spec.norm_topk_prob),
                   n_groups=spec.n_group, topk_groups=spec.topk_group if spec.n_group > 1 else None,
                   routed_scaling_factor=spec.routed_scaling_factor, router_bias=spec.router_bias,
                   n_shared_experts=spec.n_shared_experts,
                   shared_d_ff=(spec.shared_intermediate_size or None) if spec.n_shared_experts else None,
                   shared_expert_gate=spec.shared_expert_gate)
    if spec.expert_activation == "gpt_oss_swiglu":  # softmax over the top-k logits = renormalised top-k of p
        options.update(activation="swiglu_clamped", expert_bias=True, swiglu_alpha=spec.swiglu_alpha,
                       swiglu_limit=spec.swiglu_limit)
    return options


class HFDecoderLayer(Module):
    """One pre-norm decoder layer: h + attn(norm(h)), then + mlp(norm(h)); mlp is SwiGLU or MoE."""

    def __init__(self, spec: HFModelSpec, layer: int, dtype, device, generator):
        super().__init__()
        hidden, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype, device=device)
        attention = MultiHeadLatentAttention if spec.model_type == "deepseek_v3" else HFAttention
        self.self_attn = attention(spec, layer, dtype, device, generator)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype, device=device)
        self.is_moe = bool(spec.moe_layers[layer])
        if self.is_moe:
            self.mlp = MoE(d_model=hidden, d_ff=spec.moe_intermediate_size, n_experts=spec.n_experts,
                           top_k=spec.top_k, capacity_factor=None, dtype=dtype.name, device=device,
                           generator=generator, name=f"model.layers.{layer}.mlp", **moe_options(spec))
        else:
            self.mlp = SwiGLU(hidden, spec.intermediate_size, dtype=dtype, device=device, generator=generator)

    def forward(self, h, positions, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class HFDecoder(Module):
    """embed_tokens -> layers -> norm (transformers' `model` sub-module)."""

    def __init__(self, spec: HFModelSpec, dtype, device, generator):
        super().__init__()
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size, std=0.02, dtype=dtype, device=device,
                                      generator=generator)
        self.layers = ModuleList(HFDecoderLayer(spec, i, dtype, device, generator) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, dtype=dtype, device=device)


class HFCausalLM(Module):
    """A decoder language model from a transformers config: ids (B, L) -> logits (B, L, vocab).

        model = HFCausalLM(config_dict, dtype="float64", seed=0)      # random weights
        model = tinymoe.models.from_pretrained("path/to/checkpoint")   # weights from safetensors
        logits = model(ids)                                            # Tensor (B, L, vocab)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)) + coef * sum(model.aux_losses())
        out = model.generate(ids, max_new_tokens=20)                   # KV-cached decoding (generation.py)

    config: the parsed config.json dict (kept as `config`, written back by save_pretrained) or an
    HFModelSpec (then `config` is None and save_pretrained needs one passed). The config's pad_token_id
    (kept as `pad_token_id`) pads finished sequences in generate, and its embedding row gets no gradient.
    dtype: "float32" or "float64" of every parameter. seed: an int or numpy Generator for the random
    initial weights.
    """

    def __init__(self, config, dtype="float32", device="cpu", seed=0):
        super().__init__()
        if isinstance(config, HFModelSpec):
            self.config, self.spec = None, config
        elif isinstance(config, dict):
            self.config, self.spec = dict(config), parse_hf_config(config)
        else:
            raise TypeError(f"HFCausalLM: config must be a config.json dict or an HFModelSpec, "
                            f"got {type(config).__name__}")
        require_supported(self.spec.model_type)
        device = normalize_device(device)
        self.dtype = normalize_dtype(dtype, device)
        generator = as_generator(seed, "seed")
        spec = self.spec
        self.model = HFDecoder(spec, self.dtype, device, generator)
        self.tied = spec.tie_word_embeddings
        if not self.tied:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=self.dtype, device=device,
                                  generator=generator)
        pad = (self.config or {}).get("pad_token_id")
        self.pad_token_id = pad if isinstance(pad, int) and not isinstance(pad, bool) else None

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def moe_layers(self) -> list:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def aux_losses(self) -> list:
        """The load-balance loss (a scalar Tensor, 1.0 when balanced) of every MoE layer after the last forward.
        transformers' Mixtral/Qwen3-MoE/OLMoE `aux_loss` over one batch is top_k times their mean."""
        try:
            return [layer.aux_loss for layer in self.moe_layers()]
        except RuntimeError:  # an MoE layer's losses are set by a forward
            raise RuntimeError("aux_losses(): run a forward first (the MoE layers have no loss yet)") from None

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KVCache for `batch` sequences of up to `capacity` tokens."""
        return KVCache(self.spec.num_layers, batch, capacity)

    def forward(self, input_ids, cache: KVCache | None = None) -> Tensor:
        """input_ids: ints (B, L) in [0, vocab) -> logits (B, L, vocab). With `cache` the ids follow the cached
        tokens (positions cache.length ..) and their keys/values are added to it."""
        ids = np.asarray(input_ids) if not hasattr(input_ids, "__cuda_array_interface__") else input_ids
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"HFCausalLM: input_ids must be a (batch, length) integer array with length >= 1, "
                             f"got shape {ids.shape} of {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise ValueError(f"HFCausalLM: input_ids hold values in [{int(ids.min())}, {int(ids.max())}]; "
                             f"expected [0, vocab_size={self.spec.vocab_size})")
        if cache is not None and cache.batch != ids.shape[0]:
            raise ValueError(f"HFCausalLM: input_ids have batch {ids.shape[0]} but the cache holds {cache.batch}")
        positions = positions_after(0 if cache is None else cache.length, ids.shape[1])
        h = self._embed(ids)
        for layer in self.model.layers:
            h = layer(h, positions, cache)
        if cache is not None:
            cache.advance(ids.shape[1])
        h = self.model.norm(h)
        return F.linear(h, self.model.embed_tokens.weight) if self.tied else self.lm_head(h)

    def next_token_logits(self, input_ids, cache: KVCache) -> np.ndarray:
        """The logits (B, vocab) after the last of input_ids (B, L), which follow the cached tokens: what
        generate needs per step, as `self(input_ids, cache).data[:, -1]`.

        Under no_grad with NumPy weights it runs on plain arrays (hf_decoding.py): each op's own forward, without
        Tensors, graph, argument checks, module calls, the MoE layers' losses and stats (left as the last
        regular forward set them) or their finite checks; plain MoE layers compute their expert blocks directly,
        others run their module. The hidden states, and so the cache, equal the regular forward's bit for bit;
        for one new token (L == 1) the logits do too (test_generation); for L > 1 (a prefill) the head runs on
        the last row only, a GEMV instead of a GEMM over every row, and agrees to rounding. The weights' arrays
        are collected once per cache (see hf_decoding). Elsewhere (grad mode, CuPy, bad ids, DeepSeek-V3's
        latent attention) it runs the regular forward, which raises its errors."""
        ids = np.asarray(input_ids)
        weight = self.model.embed_tokens.weight
        if (is_grad_enabled() or cache is None or not isinstance(weight.data, np.ndarray) or ids.ndim != 2
                or self.spec.model_type == "deepseek_v3"
                or ids.shape[0] != cache.batch or ids.dtype.kind not in "iu"):
            return self(input_ids, cache).data[:, -1]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            return self(input_ids, cache).data[:, -1]  # the regular forward raises the error
        return next_token_logits_arrays(self, ids, cache)

    def _embed(self, ids):
        """E[ids]; the row of pad_token_id gets no gradient, as transformers' nn.Embedding(padding_idx=pad)."""
        h = self.model.embed_tokens(ids)
        pad = self.pad_token_id
        if pad is None or not is_grad_enabled() or not 0 <= pad < self.spec.vocab_size:
            return h
        is_pad = ids == pad
        if not bool(is_pad.any()):
            return h
        weight = self.model.embed_tokens.weight
        frozen = Tensor(weight.data[weight.xp.asarray(ids)])  # the same values, as a constant
        return F.where(weight.xp.asarray(is_pad)[..., None], frozen, h)

    def generate(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k=None, top_p=None,
                 seed=None, eos_token_id=None, pad_token_id=None, use_cache: bool = True, streamer=None):
        """Continue each prompt; see tinymoe.models.generation.generate for every argument."""
        return generate(self, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                        use_cache=use_cache, streamer=streamer)

    def save_pretrained(self, directory, config: dict | None = None, bf16: bool = False,
                        max_shard_bytes: int | None = None) -> None:
        """Write config.json and model.safetensors (transformers' per-expert names) so that transformers'
        `AutoModelForCausalLM.from_pretrained(directory)` and tinymoe's `from_pretrained` load them back.
        config: the config.json dict to write (default: the one the model was built from); bf16: store
        bfloat16; max_shard_bytes: write shards and model.safetensors.index.json instead of one file."""
        save_pretrained(self, directory, config, bf16=bf16, max_shard_bytes=max_shard_bytes)

    def extra_repr(self):
        return f"model_type={self.spec.model_type!r}, dtype={self.dtype.name}, tied={self.tied}"
