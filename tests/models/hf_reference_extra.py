"""Plain-loop NumPy oracles for the parts of Qwen2-MoE, GPT-OSS and DeepSeek-V3 that the Llama-style reference in
hf_model_helpers does not have, written from the transformers modeling code's formulas (token by token, head by
head, expert by expert), not from tinymoe's code:

- GPT-OSS attention: per-head sink logits in the softmax's denominator, a sliding window on "sliding_attention"
  layers; its experts: router logits W x + b, softmax over the top-k logits, gate_up = x G[e] + c[e] with gate
  = columns 0::2, up = 1::2, gate = min(gate, L), up = clip(up, -L, L), h = (up + 1)·gate·σ(α·gate),
  y = h D[e] + d[e].
- Qwen2-MoE: softmax top-k experts + shared_expert(x)·σ(w·x).
- DeepSeek-V3: multi-head latent attention (RMSNorm ε 1e-6 on the low-rank latents; rope on the rope part, pairs
  (2i, 2i+1) when rope_interleave) and sigmoid routing: s = σ(W x), choice score s + e_score_correction_bias,
  groups scored by the sum of their top-2, only the topk_group best groups eligible, weights s_ids/Σ s_ids
  (norm_topk_prob) · routed_scaling_factor, + shared experts.
Default rope only (rope_theta).
"""
import numpy as np


def rms(x, weight, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def rope(x, position, theta, interleaved=False):
    """x (D,) at `position`: pairs (i, i + D/2), or (2i, 2i + 1) rotated in place when interleaved."""
    half = x.shape[0] // 2
    angle = position * theta ** (-np.arange(half) * 2.0 / x.shape[0])
    first, second = (x[0::2], x[1::2]) if interleaved else (x[:half], x[half:])
    out = np.empty_like(x)
    rotated = first * np.cos(angle) - second * np.sin(angle), second * np.cos(angle) + first * np.sin(angle)
    if interleaved:
        out[0::2], out[1::2] = rotated
    else:
        out[:half], out[half:] = rotated
    return out


def softmax_rows(scores, sink=None):
    """softmax over the last axis; with a sink logit in the denominator only."""
    top = scores.max() if sink is None else max(scores.max(), sink)
    weights = np.exp(scores - top)
    return weights / (weights.sum() + (0.0 if sink is None else np.exp(sink - top)))


def gpt_oss_window(config, layer):
    kinds = config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(config["num_hidden_layers"])]
    return config["sliding_window"] if kinds[layer] == "sliding_attention" else None


def mla_attention(config, t, prefix, x):
    """DeepSeek-V3's latent attention of one sequence x (L, H) -> (L, H)."""
    heads, eps = config["num_attention_heads"], 1e-6
    nope, rdim, vdim, rank = (config[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
    interleaved, theta = config.get("rope_interleave", True), config.get("rope_theta", 10000.0)

    def project(name, inputs):
        out = inputs @ t[f"{prefix}{name}.weight"].T
        return out + t[f"{prefix}{name}.bias"] if f"{prefix}{name}.bias" in t else out

    if config.get("q_lora_rank") is None:
        q = project("q_proj", x)
    else:
        q = project("q_b_proj", rms(project("q_a_proj", x), t[prefix + "q_a_layernorm.weight"], eps))
    q = q.reshape(len(x), heads, nope + rdim)
    compressed = project("kv_a_proj_with_mqa", x)
    latent = rms(compressed[:, :rank], t[prefix + "kv_a_layernorm.weight"], eps)
    k_rope = np.array([rope(compressed[i, rank:], i, theta, interleaved) for i in range(len(x))])
    kv = (latent @ t[prefix + "kv_b_proj.weight"].T).reshape(len(x), heads, nope + vdim)
    scale = (nope + rdim) ** -0.5
    out = np.zeros((len(x), heads, vdim))
    for h in range(heads):
        for i in range(len(x)):
            q_rope = rope(q[i, h, nope:], i, theta, interleaved)
            scores = np.array([q[i, h, :nope] @ kv[j, h, :nope] + q_rope @ k_rope[j] for j in range(i + 1)]) * scale
            out[i, h] = softmax_rows(scores) @ kv[:i + 1, h, nope:]
    return project("o_proj", out.reshape(len(x), heads * vdim))


def _swiglu(t, prefix, x):
    silu = lambda a: a * sigmoid(a)  # noqa: E731
    return (silu(x @ t[prefix + "gate_proj.weight"].T) * (x @ t[prefix + "up_proj.weight"].T)) @ t[prefix + "down_proj.weight"].T


def gpt_oss_experts(config, t, block, x):
    top_k, alpha, limit = config["num_experts_per_tok"], config.get("swiglu_alpha", 1.702), config.get("swiglu_limit", 7.0)
    out = np.zeros_like(x)
    for token in range(len(x)):
        logits = t[block + "router.weight"] @ x[token] + t[block + "router.bias"]
        chosen = np.argsort(-logits, kind="stable")[:top_k]
        weights = softmax_rows(logits[chosen])
        for expert, weight in zip(chosen, weights):
            gate_up = x[token] @ t[block + "experts.gate_up_proj"][expert] + t[block + "experts.gate_up_proj_bias"][expert]
            gate, up = np.minimum(gate_up[0::2], limit), np.clip(gate_up[1::2], -limit, limit)
            hidden = (up + 1) * gate * sigmoid(alpha * gate)
            down = hidden @ t[block + "experts.down_proj"][expert] + t[block + "experts.down_proj_bias"][expert]
            out[token] += weight * down
    return out


def routed_experts(config, t, block, x):
    """Qwen2-MoE (softmax) or DeepSeek-V3 (sigmoid, groups) routing over per-expert SwiGLU, plus shared experts."""
    top_k, deepseek = config["num_experts_per_tok"], config["model_type"] == "deepseek_v3"
    out = np.zeros_like(x)
    for token in range(len(x)):
        logits = t[block + "gate.weight"] @ x[token]
        if deepseek:
            scores = sigmoid(logits)
            choice = scores + t[block + "gate.e_score_correction_bias"]
            groups = choice.reshape(config.get("n_group", 1), -1)
            group_scores = np.sort(groups, axis=1)[:, -2:].sum(axis=1)
            best = np.argsort(-group_scores, kind="stable")[:config.get("topk_group", 1)]
            eligible = np.full_like(groups, -np.inf)
            eligible[best] = groups[best]
            chosen = np.argsort(-eligible.ravel(), kind="stable")[:top_k]
            weights = scores[chosen]
            if config.get("norm_topk_prob", True):
                weights = weights / weights.sum()
            weights = weights * config.get("routed_scaling_factor", 1.0)
        else:
            probs = softmax_rows(logits)
            chosen = np.argsort(-probs, kind="stable")[:top_k]
            weights = probs[chosen] / (probs[chosen].sum() if config.get("norm_topk_prob", False) else 1.0)
        for expert, weight in zip(chosen, weights):
            out[token] += weight * _swiglu(t, f"{block}experts.{expert}.", x[token])
    if deepseek:
        return out + _swiglu(t, block + "shared_experts.", x)
    gate = sigmoid(x @ t[block + "shared_expert_gate.weight"].T)  # (L, 1)
    return out + gate * _swiglu(t, block + "shared_expert.", x)
