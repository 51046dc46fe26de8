"""transformers `config.json` -> `HFModelSpec`, a frozen, validated description of a decoder checkpoint in the
terms tinymoe's layers use, and the safetensors names and shapes of its weights.

Supported model_types: llama, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss
(MoE). Anything tinymoe would compute differently is a ValueError naming the field and its value, never a
silently different model. Checked for every type: hidden_act == "silu" (SwiGLU), attention_dropout == 0,
no quantization_config, rope (rope_parameters, or legacy rope_theta + rope_scaling) of a type
`rotary_frequencies` implements with only the keys it reads, positive sizes, num_attention_heads a
multiple of num_key_value_heads. Per type, besides the sizes:
- llama: mlp_bias false; attention_bias (q, k, v, o).
- qwen2 / qwen3 / qwen2_moe / qwen3_moe: use_sliding_window false (their per-layer window rules differ and no
  released checkpoint uses them); qwen2 q/k/v bias; qwen2_moe qkv_bias; qwen3*: attention_bias, RMSNorm of
  each head of q and k; MoE layers where i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
- mixtral: router_jitter_noise == 0; sliding_window (None or every layer). olmoe: clip_qkv None; RMSNorm of
  all of q and all of k. Both: experts of intermediate_size.
- deepseek_v3: scoring_func "sigmoid", topk_method "noaux_tc" (if present), moe_layer_freq 1; MLA ranks; layers
  from first_k_dense_replace on are MoE; rope_interleave -> layout "interleaved"; scale with YaRN's mscale².
- gpt_oss: layer_types of "sliding_attention" / "full_attention", sinks, biases everywhere, swiglu_alpha/limit.
The safetensors names and shapes of each spec's weights are in `hf_weights.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..functional.rotary import rotary_frequencies

DENSE_TYPES = ("llama", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
SUPPORTED_MODEL_TYPES = DENSE_TYPES + MOE_TYPES
_REQUIRED = object()


@dataclass(frozen=True, kw_only=True)
class HFModelSpec:
    """One transformers decoder, in tinymoe's terms (field = where it comes from in config.json).

    Attention: num_heads / num_kv_heads, head_dim (of q and k; DeepSeek: qk_nope + qk_rope), value_head_dim,
    attention_scale (softmax scale), qkv_bias / out_bias, qk_norm ("head": per head, "all": over the whole
    projection, None), layer_types ("full_attention" / "sliding_attention" per layer), sliding_window,
    attention_sinks. Rope: rope_theta, rope_scaling (the rope dict without rope_theta; None = default),
    rotary_dim, rope_layout ("half" / "interleaved"). MoE: moe_layers (per layer), n_experts, top_k,
    moe_intermediate_size, scoring_func ("softmax" / "sigmoid"), norm_topk_prob, router_bias,
    n_shared_experts + shared_intermediate_size (+ shared_expert_gate: Qwen2-MoE's σ(x·w) on their output),
    n_group / topk_group / routed_scaling_factor (DeepSeek), expert_activation ("swiglu" or GPT-OSS's
    "gpt_oss_swiglu" with swiglu_alpha / swiglu_limit), router_aux_loss_coef. MLA: q_lora_rank (None: a
    plain q_proj), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None
    rotary_dim: int
    rope_layout: str
    attention_scale: float
    qkv_bias: bool
    out_bias: bool
    qk_norm: str | None
    layer_types: tuple
    sliding_window: int | None
    attention_sinks: bool
    moe_layers: tuple
    n_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    router_bias: bool = False
    n_shared_experts: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    expert_activation: str = "swiglu"
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    router_aux_loss_coef: float = 0.0
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    bos_token_id: int | tuple | None = None
    eos_token_id: int | tuple | None = None


def _field(config, name, default=_REQUIRED):
    value = config.get(name, default)
    if value is _REQUIRED:
        raise ValueError(f"config.json (model_type={config['model_type']!r}) lacks the field {name!r}")
    return value


def _size(config, name, default=_REQUIRED, low=1):
    value = _field(config, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.json: {name}={value!r} must be an int >= {low}")
    return value


def _require(config, name, allowed, default=None):
    """The field's value (default when absent) when it is one of `allowed`; ValueError naming it otherwise."""
    value = config.get(name, default)
    if value not in allowed:
        raise ValueError(f"config.json: {name}={value!r} is not implemented by tinymoe (supported: {allowed!r})")
    return value


def _token_ids(value):
    return tuple(value) if isinstance(value, list) else value


def _rope(config, head_dim):
    """(theta, scaling without theta or None, rotary_dim, attention factor) from either rope format."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"config.json: rope parameters per layer type {sorted(params)} are not implemented")
    params = dict(params)
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    rotary_dim = int(head_dim * params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    try:
        _, attention_factor = rotary_frequencies(rotary_dim, theta, params, config.get("max_position_embeddings"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"config.json: rope parameters {params!r}: {error}") from None
    scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    return float(theta), scaling, rotary_dim, attention_factor


def parse_hf_config(config: dict) -> HFModelSpec:
    """An HFModelSpec from a transformers config.json dict; ValueError for anything tinymoe does not implement."""
    if not isinstance(config, dict):
        raise TypeError(f"parse_hf_config: config must be a dict (the parsed config.json), got {type(config).__name__}")
    model_type = _require(config, "model_type", SUPPORTED_MODEL_TYPES)
    _require(config, "hidden_act", ("silu",), "silu")
    if config.get("attention_dropout", 0.0) != 0:
        raise ValueError(f"config.json: attention_dropout={config['attention_dropout']!r} is not implemented (only 0)")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"config.json: quantization_config (quant_method={method!r}) is not implemented; "
                         "tinymoe loads unquantized (bf16/fp32) weights")
    hidden, heads = _size(config, "hidden_size"), _size(config, "num_attention_heads")
    kv_heads = _size(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}")
    layers = _size(config, "num_hidden_layers")
    head_dim = config.get("head_dim") or hidden // heads
    spec = dict(
        model_type=model_type, vocab_size=_size(config, "vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, value_head_dim=head_dim,
        intermediate_size=_size(config, "intermediate_size"), rms_norm_eps=float(_field(config, "rms_norm_eps")),
        max_position_embeddings=_size(config, "max_position_embeddings"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), rope_layout="half",
        qkv_bias=False, out_bias=False, qk_norm=None, layer_types=("full_attention",) * layers,
        sliding_window=None, attention_sinks=False, moe_layers=(False,) * layers,
        bos_token_id=_token_ids(config.get("bos_token_id")), eos_token_id=_token_ids(config.get("eos_token_id")),
        router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0)),
    )
    _MODEL_RULES[model_type](config, spec)
    theta, scaling, rotary_dim, _ = _rope(config, spec.pop("rope_head_dim", spec["head_dim"]))
    spec.update(rope_theta=theta, rope_scaling=scaling, rotary_dim=rotary_dim)
    spec.setdefault("attention_scale", spec["head_dim"] ** -0.5)
    return HFModelSpec(**spec)


def _experts(config, spec, n_experts_field, width_field):
    spec.update(n_experts=_size(config, n_experts_field), top_k=_size(config, "num_experts_per_tok"),
                moe_intermediate_size=_size(config, width_field),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)))
    if spec["top_k"] > spec["n_experts"]:
        raise ValueError(f"config.json: num_experts_per_tok={spec['top_k']} exceeds {n_experts_field}={spec['n_experts']}")


def _no_qwen_sliding(config):
    if config.get("use_sliding_window", False):
        raise ValueError("config.json: use_sliding_window=True is not implemented for Qwen models")


def _qwen_moe_layers(config, layers):
    step = _size(config, "decoder_sparse_step", 1)
    only_mlp = set(config.get("mlp_only_layers") or [])
    return tuple(i not in only_mlp and (i + 1) % step == 0 for i in range(layers))


def _llama(config, spec):
    _require(config, "mlp_bias", (False,), False)
    bias = bool(config.get("attention_bias", False))
    spec.update(qkv_bias=bias, out_bias=bias)


def _qwen2(config, spec):
    _no_qwen_sliding(config)
    spec.update(qkv_bias=True)


def _qwen3(config, spec):
    _no_qwen_sliding(config)
    bias = bool(config.get("attention_bias", False))
    spec.update(qkv_bias=bias, out_bias=bias, qk_norm="head")


def _mixtral(config, spec):
    if config.get("router_jitter_noise", 0.0):
        raise ValueError(f"config.json: router_jitter_noise={config['router_jitter_noise']!r} is not implemented (only 0)")
    _experts(config, spec, "num_local_experts", "intermediate_size")
    window = config.get("sliding_window")
    spec.update(moe_layers=(True,) * spec["num_layers"], sliding_window=window,
                layer_types=(("sliding_attention" if window else "full_attention"),) * spec["num_layers"])


def _qwen2_moe(config, spec):
    _no_qwen_sliding(config)
    _experts(config, spec, "num_experts", "moe_intermediate_size")
    shared = _size(config, "shared_expert_intermediate_size", 0, low=0)
    spec.update(qkv_bias=bool(config.get("qkv_bias", True)), moe_layers=_qwen_moe_layers(config, spec["num_layers"]),
                n_shared_experts=int(shared > 0), shared_intermediate_size=shared, shared_expert_gate=shared > 0)


def _qwen3_moe(config, spec):
    _qwen3(config, spec)
    experts_field = "num_experts" if "num_experts" in config else "num_local_experts"
    _experts(config, spec, experts_field, "moe_intermediate_size")
    spec.update(moe_layers=_qwen_moe_layers(config, spec["num_layers"]))


def _olmoe(config, spec):
    if config.get("clip_qkv") is not None:
        raise ValueError(f"config.json: clip_qkv={config['clip_qkv']!r} is not implemented (only None)")
    experts_field = "num_experts" if "num_experts" in config else "num_local_experts"
    _experts(config, spec, experts_field, "intermediate_size")
    bias = bool(config.get("attention_bias", False))
    spec.update(qkv_bias=bias, out_bias=bias, qk_norm="all", moe_layers=(True,) * spec["num_layers"])


def _deepseek_v3(config, spec):
    _require(config, "scoring_func", ("sigmoid",), "sigmoid")
    _require(config, "topk_method", ("noaux_tc",), "noaux_tc")
    _require(config, "moe_layer_freq", (1,), 1)
    _experts(config, spec, "n_routed_experts", "moe_intermediate_size")
    nope, rope = _size(config, "qk_nope_head_dim"), _size(config, "qk_rope_head_dim")
    n_group, topk_group = _size(config, "n_group", 1), _size(config, "topk_group", 1)
    if spec["n_experts"] % n_group or topk_group > n_group:
        raise ValueError(f"config.json: n_group={n_group} must divide n_routed_experts={spec['n_experts']} "
                         f"and be >= topk_group={topk_group}")
    first_dense = _size(config, "first_k_dense_replace", 0, low=0)
    q_lora = config.get("q_lora_rank")
    bias = bool(config.get("attention_bias", False))
    spec.update(
        head_dim=nope + rope, value_head_dim=_size(config, "v_head_dim"), rope_head_dim=rope,
        q_lora_rank=None if q_lora is None else _size(config, "q_lora_rank"), kv_lora_rank=_size(config, "kv_lora_rank"),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, qkv_bias=bias, out_bias=bias,
        rope_layout="interleaved" if config.get("rope_interleave", True) else "half",
        moe_layers=tuple(i >= first_dense for i in range(spec["num_layers"])), scoring_func="sigmoid",
        n_shared_experts=_size(config, "n_shared_experts", 0, low=0), n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        attention_scale=(nope + rope) ** -0.5 * _deepseek_mscale(config) ** 2,
    )
    spec["shared_intermediate_size"] = spec["n_shared_experts"] * spec["moe_intermediate_size"]


def _deepseek_mscale(config):
    """DeepSeek's softmax scale factor: (0.1·mscale_all_dim·ln(factor) + 1) for a scaled rope, else 1."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    factor, all_dim = params.get("factor"), params.get("mscale_all_dim")
    if params.get("rope_type", params.get("type", "default")) == "default" or not all_dim or factor is None:
        return 1.0
    return 1.0 if factor <= 1 else 0.1 * all_dim * math.log(factor) + 1.0


def _gpt_oss(config, spec):
    experts_field = "num_local_experts" if "num_local_experts" in config else "num_experts"
    _experts(config, spec, experts_field, "intermediate_size")
    layers = spec["num_layers"]
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if len(layer_types) != layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types={layer_types!r} must list {layers} of "
                         "'sliding_attention' / 'full_attention'")
    window = _size(config, "sliding_window") if "sliding_attention" in layer_types else None
    spec.update(qkv_bias=bool(config.get("attention_bias", True)), out_bias=bool(config.get("attention_bias", True)),
                layer_types=tuple(layer_types), sliding_window=window, attention_sinks=True,
                moe_layers=(True,) * layers, router_bias=True, expert_activation="gpt_oss_swiglu",
                swiglu_alpha=float(config.get("swiglu_alpha", 1.702)), swiglu_limit=float(config.get("swiglu_limit", 7.0)))


_MODEL_RULES = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe,
                "qwen3_moe": _qwen3_moe, "olmoe": _olmoe, "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss}

