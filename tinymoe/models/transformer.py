"""`MoETransformer`: a small decoder-only language model whose feed-forward blocks are MoE layers.

    h_0 = E[tokens] + P[positions]
    h   = h + Attention(RMSNorm(h))        causal multi-head self-attention
    h   = h + FFN(RMSNorm(h))              an MoE layer, or a dense SwiGLU block, per layer
    logits = RMSNorm(h) Eᵀ                  output head tied to the token embedding

    loss = cross_entropy + Σ_layers (aux_coef · aux + z_coef · z [+ noisy_coef · (importance + load)]
                                     [+ entropy_coef · H(p) (top_p)] [+ l1 (relu: λ inside)])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .. import functional as F
from ..engine.autograd import no_grad
from ..engine.backend import normalize_dtype, to_numpy
from ..engine.checks import check_finite, finite_checks_enabled, require_int, require_number
from ..engine.random import as_generator
from ..engine.tensor import Tensor
from ..nn import Dropout, Embedding, Linear, Module, ModuleList, MoE, MoEConfig, RMSNorm, SwiGLU
from .transformer_generation import can_cache, generate_tokens


# The MoE options of the flat model configs of earlier releases (checkpoints written by them still load).
FLAT_MOE_KEYS = ("d_ff", "n_experts", "top_k", "router", "normalize_top_k", "capacity_factor", "n_shared_experts",
                 "jitter", "bias_update_rate", "activation")
# The MoE sizes a model gets when its config names none (MoEConfig itself has no default sizes).
DEFAULT_MOE_SIZES = {"d_ff": 128, "n_experts": 4}


@dataclass
class TransformerConfig:
    """The model's options; its feed-forward blocks are set by `moe` (a MoEConfig).

    moe: a MoEConfig whose d_model and dtype equal the model's, or a dict of MoEConfig options without them
    (filled in from the model, with d_ff=128 and n_experts=4 unless given), or None for those defaults.
    A dense block (a layer outside moe_layers) is a SwiGLU of width moe.d_ff · moe.top_k: the active width of
    an MoE block.
    """

    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 64
    moe: MoEConfig | dict | None = None
    moe_layers: list = field(default_factory=lambda: ["all"])  # layer indices with an MoE block, or ["all"]
    aux_coef: float = 0.01
    z_coef: float = 0.001
    noisy_coef: float = 0.01
    entropy_coef: float = 0.0  # router='top_p': weight of the mean router entropy (Huang et al. 2024)
    dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            require_int(getattr(self, name), name, "TransformerConfig", low=1)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        self.dtype = normalize_dtype(self.dtype, "cuda").name
        self.moe = self._moe_config(self.moe)
        layers = self.moe_layer_indices()
        bad = [index for index in layers if not 0 <= index < self.n_layers]
        if bad:
            raise ValueError(f"moe_layers={self.moe_layers!r} names layers {bad} outside 0..{self.n_layers - 1}")
        for name in ("aux_coef", "z_coef", "noisy_coef", "entropy_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be non-negative")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")

    def _moe_config(self, moe) -> MoEConfig:
        if moe is None or isinstance(moe, dict):
            options = {**DEFAULT_MOE_SIZES, "d_model": self.d_model, "dtype": self.dtype, **(moe or {})}
            moe = MoEConfig.from_dict(options)
        if not isinstance(moe, MoEConfig):
            raise TypeError(f"TransformerConfig: moe must be a MoEConfig, a dict or None, got {type(moe).__name__}")
        for name in ("d_model", "dtype"):
            if getattr(moe, name) != getattr(self, name):
                raise ValueError(f"TransformerConfig: moe.{name}={getattr(moe, name)!r} must equal "
                                 f"{name}={getattr(self, name)!r} (the MoE blocks are the model's layers)")
        return moe

    def moe_layer_indices(self) -> list:
        if list(self.moe_layers) == ["all"]:
            return list(range(self.n_layers))
        return sorted(int(index) for index in self.moe_layers)

    def to_dict(self) -> dict:
        """JSON-ready values; the MoE options nested under "moe"."""
        return {**asdict(self), "moe": self.moe.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "TransformerConfig":
        """The inverse of to_dict; also reads the flat dicts of earlier releases (MoE options at top level)."""
        values = dict(values)
        flat = {key: values.pop(key) for key in FLAT_MOE_KEYS if key in values}
        if flat:
            if values.get("moe") is not None:
                raise ValueError(f"model config has both a 'moe' entry and flat MoE keys {sorted(flat)}")
            values["moe"] = flat
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**values)


class CausalSelfAttention(Module):
    """Multi-head attention: q, k, v = x Wqᵀ, x Wkᵀ, x Wvᵀ split into heads; softmax(q kᵀ/√dh + causal) v; Wo."""

    def __init__(self, d_model, n_heads, dtype, device, generator):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.query = Linear(d_model, d_model, bias=False, dtype=dtype, device=device, generator=generator)
        self.key = Linear(d_model, d_model, bias=False, dtype=dtype, device=device, generator=generator)
        self.value = Linear(d_model, d_model, bias=False, dtype=dtype, device=device, generator=generator)
        self.out = Linear(d_model, d_model, bias=False, dtype=dtype, device=device, generator=generator)

    def _heads(self, x, batch, length):
        return x.reshape(batch, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (self._heads(projection(x), batch, length) for projection in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, causal=True)
        return self.out(attended.transpose(0, 2, 1, 3).reshape(batch, length, width))


class Block(Module):
    def __init__(self, config: TransformerConfig, index: int, device, generator):
        super().__init__()
        c = config
        self.attention_norm = RMSNorm(c.d_model, dtype=c.dtype, device=device)
        self.attention = CausalSelfAttention(c.d_model, c.n_heads, c.dtype, device, generator)
        self.ffn_norm = RMSNorm(c.d_model, dtype=c.dtype, device=device)
        self.is_moe = index in c.moe_layer_indices()
        if self.is_moe:
            self.ffn = MoE(c.moe, device=device, generator=generator, name=f"blocks.{index}.ffn")
        else:  # dense block with the active width of the MoE layers: top_k experts of width d_ff
            self.ffn = SwiGLU(c.d_model, c.moe.d_ff * c.moe.top_k, dtype=c.dtype, device=device, generator=generator,
                              name=f"blocks.{index}.ffn")
        self.dropout = Dropout(c.dropout, generator=generator)

    def forward(self, h):
        h = h + self.dropout(self.attention(self.attention_norm(h)))
        return h + self.dropout(self.ffn(self.ffn_norm(h)))


class MoETransformer(Module):
    def __init__(self, config: TransformerConfig, device="cpu", seed=0):
        super().__init__()
        self.config = config
        generator = as_generator(seed, "seed")
        c = config
        self.token_embedding = Embedding(c.vocab_size, c.d_model, std=0.02, dtype=c.dtype, device=device,
                                         generator=generator)
        self.position_embedding = Embedding(c.max_seq_len, c.d_model, std=0.02, dtype=c.dtype, device=device,
                                            generator=generator)
        self.blocks = ModuleList(Block(c, index, device, generator) for index in range(c.n_layers))
        self.final_norm = RMSNorm(c.d_model, dtype=c.dtype, device=device)

    def moe_layers(self) -> list:
        return [block.ffn for block in self.blocks if block.is_moe]

    def forward(self, tokens) -> Tensor:
        """tokens: int array (B, L) with L ≤ max_seq_len → logits (B, L, vocab_size)."""
        tokens = np.asarray(tokens) if not hasattr(tokens, "__cuda_array_interface__") else tokens
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be a 2-D integer array (batch, length), got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={self.config.max_seq_len}")
        xp = self.token_embedding.weight.xp
        h = self.token_embedding(xp.asarray(tokens)) + self.position_embedding(xp.arange(length))
        for block in self.blocks:
            h = block(h)
        logits = F.linear(self.final_norm(h), self.token_embedding.weight)  # tied output head
        check_finite(logits.data, "MoETransformer: logits are not finite (NaN or inf): check the embedding and "
                                  "attention weights (the MoE and dense blocks checked their outputs)")
        return logits

    def loss(self, tokens, targets):
        """(total loss, parts): floats "total", "cross_entropy", and "aux", "z", "noisy" averaged over the MoE
        layers (so aux = 1.0 means balanced); the total sums the weighted losses of every layer.
        The floats come to the host in one transfer (one GPU sync per call)."""
        logits = self.forward(tokens)
        xp = logits.xp
        cross_entropy = F.cross_entropy(logits.reshape(-1, self.config.vocab_size), xp.asarray(targets).reshape(-1))
        c, layers = self.config, self.moe_layers()
        total, reported = cross_entropy, {"aux": [], "z": [], "noisy": []}
        for layer in layers:
            total = total + c.aux_coef * layer.aux_loss + c.z_coef * layer.z_loss
            reported["aux"].append(layer.aux_loss)
            reported["z"].append(layer.z_loss)
            if layer.importance_loss is not None:
                noisy = layer.importance_loss + layer.load_loss
                total = total + c.noisy_coef * noisy
                reported["noisy"].append(noisy)
            if layer.entropy_loss is not None:  # router='top_p'
                total = total + c.entropy_coef * layer.entropy_loss
            if layer.l1_loss is not None:  # router='relu': ReMoE's adaptive λ is already inside
                total = total + layer.l1_loss
        scalars = [total, cross_entropy, *reported["aux"], *reported["z"], *reported["noisy"]]
        values = to_numpy(xp.stack([scalar.data.astype(xp.float64) for scalar in scalars])).tolist()
        if finite_checks_enabled() and not all(math.isfinite(value) for value in values):  # host values: free
            names = ["total", "cross_entropy"] + [f"{kind} of {layer.label}" for kind in ("aux", "z", "noisy")
                                                  for layer in layers if kind != "noisy" or layer.load_loss is not None]
            bad = [name for name, value in zip(names, values) if not math.isfinite(value)]
            raise FloatingPointError(f"MoETransformer.loss: {', '.join(bad)} not finite (NaN or inf)")
        parts = {"total": values[0], "cross_entropy": values[1]}
        position, n_moe = 2, max(len(layers), 1)
        for name in ("aux", "z", "noisy"):
            count = len(reported[name])
            parts[name] = sum(values[position:position + count]) / n_moe
            position += count
        return total, parts

    @no_grad()
    def generate(self, prompt, length: int, temperature: float = 1.0, top_k: int | None = None, generator=None,
                 use_cache: bool | None = None):
        """Sample `length` tokens after `prompt` (a non-empty sequence of token ids in [0, vocab_size)); returns
        the new ids. The context is the last max_seq_len tokens. temperature: a finite number >= 0 (0 = greedy,
        argmax); top_k: None or an int >= 1. Uses eval mode. use_cache: None = a KV cache when the MoE layers
        are dropless token choice (same tokens as without it), False = recompute the context every step
        (transformer_generation.py)."""
        prompt = self._prompt_ids(prompt)
        length = require_int(length, "length", "generate", low=0)
        temperature = require_number(temperature, "temperature", "generate")
        if not temperature >= 0:
            raise ValueError(f"generate: temperature={temperature!r} must be >= 0 (0 = greedy)")
        if top_k is not None:
            require_int(top_k, "top_k", "generate", low=1)
        if use_cache is not None and not isinstance(use_cache, bool):
            raise TypeError(f"generate: use_cache={use_cache!r} must be None, True or False")
        if use_cache and not can_cache(self):
            raise ValueError("generate: use_cache=True needs dropless token-choice MoE layers (capacity_factor "
                             "None, router not 'expert_choice'): otherwise a token's routing depends on its window")
        generator = as_generator(generator)
        was_training = self.training
        self.eval()
        try:
            return generate_tokens(self, prompt, length, temperature, top_k, generator, use_cache)
        finally:
            self.train(was_training)

    def _prompt_ids(self, prompt) -> list:
        """`prompt` as a list of Python ints, each a token id in [0, vocab_size); a clear error otherwise."""
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
            raise TypeError(f"generate: prompt must be a sequence of token ids (ints), got {type(prompt).__name__}")
        if hasattr(prompt, "shape") and len(prompt.shape) != 1:
            raise ValueError(f"generate: prompt must be 1-D (a sequence of token ids), got shape {tuple(prompt.shape)}")
        ids = list(prompt)
        if not ids:
            raise ValueError("generate: prompt is empty; give at least one token id to continue from")
        vocab = self.config.vocab_size
        for position, token in enumerate(ids):
            if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
                raise TypeError(f"generate: prompt[{position}]={token!r} must be an int token id")
            if not 0 <= token < vocab:
                raise ValueError(f"generate: prompt[{position}]={int(token)} is outside the vocabulary "
                                 f"[0, {vocab}) (vocab_size={vocab})")
        return [int(token) for token in ids]
