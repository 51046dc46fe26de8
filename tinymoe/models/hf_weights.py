"""Safetensors names and shapes of the weights of a transformers checkpoint described by an `HFModelSpec`.

layout="checkpoint": the safetensors files transformers 5 writes (save_pretrained) and the Hub ships: one
tensor per expert (Mixtral: block_sparse_moe.experts.{e}.w1 gate / w3 up / w2 down). layout="transformers":
the model's state_dict in memory, where experts are fused: experts.gate_up_proj (E, 2·I, H) holding
[gate; up] and experts.down_proj (E, H, I). GPT-OSS is fused in both, transposed (E, H, 2·I) with gate and up
interleaved in columns (gate = 0::2, up = 1::2), and (E, I, H), with biases.
"""
from __future__ import annotations

from .hf_config import HFModelSpec

WEIGHT_LAYOUTS = ("checkpoint", "transformers")


def _linear(weights, name, out_features, in_features, bias=False):
    weights[name + ".weight"] = (out_features, in_features)
    if bias:
        weights[name + ".bias"] = (out_features,)


def _swiglu(weights, prefix, hidden, width, names=("gate_proj", "up_proj", "down_proj")):
    _linear(weights, prefix + names[0], width, hidden)
    _linear(weights, prefix + names[1], width, hidden)
    _linear(weights, prefix + names[2], hidden, width)


def _attention_shapes(spec, weights, prefix):
    hidden, heads, kv_heads, dim = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    if spec.model_type == "deepseek_v3":
        if spec.q_lora_rank is None:
            _linear(weights, prefix + "q_proj", heads * dim, hidden)
        else:
            _linear(weights, prefix + "q_a_proj", spec.q_lora_rank, hidden, spec.qkv_bias)
            weights[prefix + "q_a_layernorm.weight"] = (spec.q_lora_rank,)
            _linear(weights, prefix + "q_b_proj", heads * dim, spec.q_lora_rank)
        _linear(weights, prefix + "kv_a_proj_with_mqa", spec.kv_lora_rank + spec.qk_rope_head_dim, hidden, spec.qkv_bias)
        weights[prefix + "kv_a_layernorm.weight"] = (spec.kv_lora_rank,)
        _linear(weights, prefix + "kv_b_proj", heads * (spec.qk_nope_head_dim + spec.value_head_dim), spec.kv_lora_rank)
        _linear(weights, prefix + "o_proj", hidden, heads * spec.value_head_dim, spec.out_bias)
        return
    for name, width in (("q_proj", heads * dim), ("k_proj", kv_heads * dim), ("v_proj", kv_heads * dim)):
        _linear(weights, prefix + name, width, hidden, spec.qkv_bias)
    _linear(weights, prefix + "o_proj", hidden, heads * dim, spec.out_bias)
    if spec.qk_norm is not None:
        per_head = spec.qk_norm == "head"
        weights[prefix + "q_norm.weight"] = (dim if per_head else heads * dim,)
        weights[prefix + "k_norm.weight"] = (dim if per_head else kv_heads * dim,)
    if spec.attention_sinks:
        weights[prefix + "sinks"] = (heads,)


def _moe_shapes(spec, weights, prefix, layout):
    hidden, experts, width = spec.hidden_size, spec.n_experts, spec.moe_intermediate_size
    if spec.model_type == "gpt_oss":
        _linear(weights, prefix + "mlp.router", experts, hidden, bias=True)
        weights.update({prefix + "mlp.experts.gate_up_proj": (experts, hidden, 2 * width),
                        prefix + "mlp.experts.gate_up_proj_bias": (experts, 2 * width),
                        prefix + "mlp.experts.down_proj": (experts, width, hidden),
                        prefix + "mlp.experts.down_proj_bias": (experts, hidden)})
        return
    block = prefix + ("block_sparse_moe." if spec.model_type == "mixtral" and layout == "checkpoint" else "mlp.")
    _linear(weights, block + "gate", experts, hidden)
    if spec.model_type == "deepseek_v3":
        weights[block + "gate.e_score_correction_bias"] = (experts,)
    if layout == "transformers":
        weights[block + "experts.gate_up_proj"] = (experts, 2 * width, hidden)
        weights[block + "experts.down_proj"] = (experts, hidden, width)
    else:
        names = ("w1", "w3", "w2") if spec.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for expert in range(experts):
            _swiglu(weights, f"{block}experts.{expert}.", hidden, width, names)
    if spec.n_shared_experts:
        shared = "shared_experts." if spec.model_type == "deepseek_v3" else "shared_expert."
        _swiglu(weights, block + shared, hidden, spec.shared_intermediate_size)
    if spec.shared_expert_gate:
        _linear(weights, block + "shared_expert_gate", 1, hidden)


def layer_weight_shapes(spec: HFModelSpec, layer: int, layout: str = "checkpoint") -> dict:
    """{safetensors key: shape} of decoder layer `layer` (keys start with model.layers.{layer}.)."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"layer_weight_shapes: layout={layout!r} must be one of {WEIGHT_LAYOUTS}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.num_layers:
        raise ValueError(f"layer_weight_shapes: layer={layer!r} must be an int in [0, {spec.num_layers})")
    prefix = f"model.layers.{layer}."
    weights = {prefix + "input_layernorm.weight": (spec.hidden_size,),
               prefix + "post_attention_layernorm.weight": (spec.hidden_size,)}
    _attention_shapes(spec, weights, prefix + "self_attn.")
    if spec.moe_layers[layer]:
        _moe_shapes(spec, weights, prefix, layout)
    else:
        _swiglu(weights, prefix + "mlp.", spec.hidden_size, spec.intermediate_size)
    return weights


def model_weight_shapes(spec: HFModelSpec, layout: str = "checkpoint") -> dict:
    """{key: shape} of the whole model: embeddings, every layer, the final norm and lm_head (absent from the
    checkpoint layout when tie_word_embeddings: the head is the embedding matrix)."""
    weights = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for layer in range(spec.num_layers):
        weights.update(layer_weight_shapes(spec, layer, layout))
    weights["model.norm.weight"] = (spec.hidden_size,)
    if layout == "transformers" or not spec.tie_word_embeddings:
        weights["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    return weights
