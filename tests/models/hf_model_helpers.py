"""Tiny transformers-format checkpoints written with NumPy alone, and a plain-loop NumPy decoder used as the
oracle where torch is absent.

`write_checkpoint` writes config.json and random weights under the names and shapes of hf_weights'
model_weight_shapes (itself checked against transformers in test_hf_config.py) with tinymoe.io's writer;
it does not use the model code under test. `reference_logits` recomputes a decoder from those arrays
token by token, head by head and expert by expert (default RoPE only; the Qwen2-MoE, GPT-OSS and DeepSeek-V3
parts are in hf_reference_extra.py).
"""
import json
import os

import numpy as np

import hf_reference_extra as extra
from tinymoe.io import save_safetensors, save_safetensors_sharded
from tinymoe.models.hf_config import parse_hf_config
from tinymoe.models.hf_weights import model_weight_shapes

SMALL = dict(vocab_size=13, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=24, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)
# Hand-written config.json dicts, one per supported model_type (sizes as in test_hf_config.py).
CONFIGS = {
    "llama": dict(model_type="llama", **SMALL, head_dim=6),
    "llama_tied_bias": dict(model_type="llama", **SMALL, tie_word_embeddings=True, attention_bias=True),
    "qwen2": dict(model_type="qwen2", **SMALL),
    "qwen3": dict(model_type="qwen3", **SMALL, head_dim=6),
    "mixtral": dict(model_type="mixtral", **SMALL, num_local_experts=3, num_experts_per_tok=2),
    "mixtral_sliding": dict(model_type="mixtral", **SMALL, num_local_experts=3, num_experts_per_tok=1, sliding_window=3),
    "qwen3_moe": dict(model_type="qwen3_moe", **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      head_dim=6, decoder_sparse_step=2, norm_topk_prob=True),
    "olmoe": dict(model_type="olmoe", **SMALL, num_experts=3, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      shared_expert_intermediate_size=12, mlp_only_layers=[0]),
    # swiglu_limit 1: the clamps of the experts' gate and up are reached with these weights
    "gpt_oss": dict(model_type="gpt_oss", **SMALL, num_local_experts=3, num_experts_per_tok=2, head_dim=6,
                    sliding_window=3, swiglu_limit=1.0),
    # n_group 2, topk_group 1: the experts of one group of two only; MLA needs num_key_value_heads = heads
    "deepseek_v3": dict(model_type="deepseek_v3", **{**SMALL, "num_key_value_heads": 4}, n_routed_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=8, n_group=2, topk_group=1,
                        first_k_dense_replace=1, q_lora_rank=10, kv_lora_rank=6, qk_nope_head_dim=4,
                        qk_rope_head_dim=2, v_head_dim=5, n_shared_experts=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5),
}


def random_weights(config, seed=0, scale=0.3):
    """{checkpoint key: float32 array} for `config`: norms near 1, the rest N(0, scale²)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape in model_weight_shapes(parse_hf_config(config)).items():
        if key.endswith("norm.weight"):
            tensors[key] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return tensors


def write_checkpoint(directory, config, tensors=None, seed=0, shard_bytes=None, bf16=False):
    """config.json + model.safetensors (or shards of at most shard_bytes with their index); returns the tensors."""
    os.makedirs(directory, exist_ok=True)
    tensors = random_weights(config, seed) if tensors is None else tensors
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle)
    if shard_bytes is None:
        save_safetensors(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}, bf16=bf16)
    else:
        save_safetensors_sharded(tensors, directory, max_shard_bytes=shard_bytes, metadata={"format": "pt"}, bf16=bf16)
    return tensors


def _rms(x, weight, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def _silu(x):
    return x / (1 + np.exp(-x))


def _rope(x, position, theta):
    """x (D,) at `position`, default RoPE with rotate_half pairs (i, i + D/2)."""
    half = x.shape[0] // 2
    angle = position * theta ** (-np.arange(half) * 2.0 / x.shape[0])
    first, second = x[:half], x[half:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle), second * np.cos(angle) + first * np.sin(angle)])


def _attention(config, t, prefix, x, layer=None):
    """x (L, H) of one sequence -> (L, H); loops over query heads and positions. layer: the layer's index (GPT-OSS
    reads its window kind from it)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    eps, kind = config["rms_norm_eps"], config["model_type"]
    if kind == "deepseek_v3":
        return extra.mla_attention(config, t, prefix, x)
    window = config.get("sliding_window") if kind == "mixtral" else None
    if kind == "gpt_oss":
        window = extra.gpt_oss_window(config, layer)

    def project(name):
        out = x @ t[f"{prefix}{name}.weight"].T
        return out + t[f"{prefix}{name}.bias"] if f"{prefix}{name}.bias" in t else out

    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    if kind == "olmoe":
        q, k = _rms(q, t[prefix + "q_norm.weight"], eps), _rms(k, t[prefix + "k_norm.weight"], eps)
    q, k, v = (a.reshape(len(x), -1, dim) for a in (q, k, v))
    if kind in ("qwen3", "qwen3_moe"):
        q, k = _rms(q, t[prefix + "q_norm.weight"], eps), _rms(k, t[prefix + "k_norm.weight"], eps)
    theta = config.get("rope_theta", 10000.0)
    q = np.array([[_rope(q[i, h], i, theta) for h in range(heads)] for i in range(len(x))])
    k = np.array([[_rope(k[i, h], i, theta) for h in range(kv_heads)] for i in range(len(x))])
    out = np.zeros((len(x), heads, dim))
    for h in range(heads):
        kv = h // (heads // kv_heads)
        for i in range(len(x)):
            keys = [j for j in range(i + 1) if window is None or j > i - window]
            scores = np.array([q[i, h] @ k[j, kv] for j in keys]) / np.sqrt(dim)
            sink = t[prefix + "sinks"][h] if kind == "gpt_oss" else None
            out[i, h] = extra.softmax_rows(scores, sink) @ v[keys, kv]
    out = out.reshape(len(x), heads * dim) @ t[prefix + "o_proj.weight"].T
    return out + t[prefix + "o_proj.bias"] if prefix + "o_proj.bias" in t else out


def _feed_forward(config, t, layer, x):
    spec = parse_hf_config(config)  # which layers are MoE (checked against transformers in test_hf_config)
    prefix = f"model.layers.{layer}."
    if not spec.moe_layers[layer]:
        mlp = prefix + "mlp."
        return (_silu(x @ t[mlp + "gate_proj.weight"].T) * (x @ t[mlp + "up_proj.weight"].T)) @ t[mlp + "down_proj.weight"].T
    mixtral = config["model_type"] == "mixtral"
    block = prefix + ("block_sparse_moe." if mixtral else "mlp.")
    if config["model_type"] == "gpt_oss":
        return extra.gpt_oss_experts(config, t, block, x)
    if config["model_type"] in ("qwen2_moe", "deepseek_v3"):
        return extra.routed_experts(config, t, block, x)
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    top_k = config["num_experts_per_tok"]
    normalize = mixtral or config.get("norm_topk_prob", False)
    out = np.zeros_like(x)
    for token in range(len(x)):
        logits = t[block + "gate.weight"] @ x[token]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[:top_k]
        weights = probs[chosen] / (probs[chosen].sum() if normalize else 1.0)
        for expert, weight in zip(chosen, weights):
            gate, up, down = (t[f"{block}experts.{expert}.{name}.weight"] for name in names)
            out[token] += weight * (down @ (_silu(gate @ x[token]) * (up @ x[token])))
    return out


def reference_logits(config, tensors, ids):
    """Logits (B, L, V) float64 of the checkpoint `tensors` (checkpoint names) for ids (B, L), by plain loops."""
    t = {key: np.asarray(value, dtype=np.float64) for key, value in tensors.items()}
    eps = config["rms_norm_eps"]
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    logits = []
    for sequence in np.asarray(ids):
        h = t["model.embed_tokens.weight"][sequence]
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}."
            h = h + _attention(config, t, prefix + "self_attn.", _rms(h, t[prefix + "input_layernorm.weight"], eps), layer)
            h = h + _feed_forward(config, t, layer, _rms(h, t[prefix + "post_attention_layernorm.weight"], eps))
        logits.append(_rms(h, t["model.norm.weight"], eps) @ head.T)
    return np.array(logits)
