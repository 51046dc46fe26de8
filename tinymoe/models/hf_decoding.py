"""`HFCausalLM.next_token_logits` on plain arrays: generate's prefill and decoding steps under no_grad, with
each op's own forward (Function.forward with a no-grad Context) and none of the Tensors, graph, argument
checks, module calls, MoE losses, stats or finite checks of the regular forward, which it equals bit for bit
in the hidden states (and so in the KV cache; test_generation).

    h = E[ids];  per layer:  h += attn(rms(h)) (HFAttention.forward_arrays);  h += mlp(rms(h))
    logits = rms(h[:, -1]) Wᵀ                  the last row only: a GEMV, not a GEMM over every row

The arrays each step reads (norm weights, projections, the experts' weights) are collected once per KVCache
(`layer_arrays`, kept in cache.derived): a cache is one decoding, generate makes a fresh one per call. They
are the parameters' own arrays, except the stacked q|k|v weights and per-head norm weights of
`HFAttention.decoding_arrays`, which are copies made then: a parameter changed (in place or given a new
array) while a cache is in use is not seen by that cache (whose cached keys would be stale anyway).
"""
from __future__ import annotations

import numpy as np

from ..engine.array_math import softmax, stable_top_k
from ..engine.function import Context
from ..engine.tensor import Tensor
from ..functional.experts import joint_gate_up
from ..functional.linear import Linear as LinearOp
from ..functional.norms import RMSNorm as RMSNormOp
from ..kernels.registry import implementation
from ..nn.gating import SoftmaxTopK
from .hf_attention import positions_after


def next_token_logits_arrays(model, ids, cache):
    """The logits (B, vocab) after ids (B, L) (ints, validated by the caller) that follow the cache's tokens."""
    ctx = Context(np, (), False)
    weight = model.model.embed_tokens.weight.data
    h = weight[ids]  # this call's own array: updated in place below
    layers = model.model.layers
    rotation = layers[0].self_attn.rotary_tables(positions_after(cache.length, ids.shape[1]), h.dtype)
    for layer, (input_norm, attention, post_norm, mlp) in zip(layers, layer_arrays(model, cache)):
        h += layer.self_attn.forward_arrays(RMSNormOp.forward(ctx, h, *input_norm), rotation, cache, attention)
        normed = RMSNormOp.forward(ctx, h, *post_norm)
        h += moe_arrays(ctx, mlp, normed) if mlp is not None else layer.mlp(Tensor(normed)).data
    cache.advance(ids.shape[1])
    norm = model.model.norm
    last = RMSNormOp.forward(ctx, h[:, -1], norm.weight.data, norm.eps)
    head = weight if model.tied else model.lm_head.weight.data
    return LinearOp.forward(ctx, last, head, None)


def layer_arrays(model, cache):
    """Per decoder layer: ((input norm weight, eps), the attention's `decoding_arrays()`, (post norm weight,
    eps), the MoE's `moe_layer_arrays` or None (a dense or other MLP: its module runs)); once per cache."""
    found = cache.derived.get("hf_layers")
    if found is None or found[0] is not model:
        arrays = [((layer.input_layernorm.weight.data, layer.input_layernorm.eps), layer.self_attn.decoding_arrays(),
                   (layer.post_attention_layernorm.weight.data, layer.post_attention_layernorm.eps),
                   moe_layer_arrays(layer.mlp) if layer.is_moe else None) for layer in model.model.layers]
        found = cache.derived["hf_layers"] = (model, arrays)
    return found[1]


def moe_layer_arrays(moe):
    """(router weight, router bias or None, top_k, normalize_top_k, groups, w1, w3, w2) of a plain tm.nn.MoE
    (softmax top-k router, SwiGLU experts without bias, no capacity, null or shared experts, no jitter); None
    for other layers (their module runs)."""
    router, experts = moe.router, moe.experts
    plain = (router.kind == "softmax" and experts.activation == "swiglu" and not experts.expert_bias
             and not moe.n_shared_experts and router.capacity_factor is None and router.routed_scaling_factor == 1.0
             and not router.n_null_experts and moe.capacity_per != "sequence"
             and not (router.training and router.jitter > 0))
    if not plain:
        return None
    bias = getattr(router, "logit_bias", None)
    return (router.weight.data, None if bias is None else bias.data, router.top_k, router.normalize_top_k,
            router.groups, experts.w1.data, experts.w3.data, experts.w2.data)


def _one_token(arrays, row):
    """`moe_arrays` for one row (1, d), a decoding step, with the fewest calls: the router's logits as
    Linear's forward computes them for one row, the top-k and weights as SoftmaxTopK's forward (stable_top_k
    of the logits; normalize: softmax of the chosen logits, else the chosen entries of softmax(logits)), the
    probabilities only where the weights need them; a and b GEMVs into the two contiguous halves of one
    (2, k, ff) buffer; one swiglu; y_j = h_j w2[e_j]ᵀ and the combine Σ_j w_j y_j from zero in slot order."""
    router_weight, router_bias, top_k, normalize, _, w1, w3, w2 = arrays
    logits = row @ router_weight.T
    if router_bias is not None:
        logits = logits + router_bias
    expert_ids = stable_top_k(logits, top_k)
    chosen = expert_ids[0].tolist()
    weights = softmax(logits[:, chosen], axis=1) if normalize else softmax(logits, axis=1)[:, chosen]
    gate_up = np.empty((2, top_k, w1.shape[1]), row.dtype)
    for slot, expert in enumerate(chosen):
        np.matmul(row, w1[expert].T, out=gate_up[0, slot:slot + 1])
        np.matmul(row, w3[expert].T, out=gate_up[1, slot:slot + 1])
    hidden = implementation(row).swiglu(gate_up[0], gate_up[1])
    out = np.zeros_like(row)
    for slot, expert in enumerate(chosen):
        out += weights[:, slot:slot + 1] * (hidden[slot:slot + 1] @ w2[expert].T)
    return out


def moe_arrays(ctx, arrays, x):
    """tm.nn.MoE's forward on arrays, x (B, L, d), for `moe_layer_arrays`: the router's logits and SoftmaxTopK,
    then each expert's block of rows as SwiGLUExperts computes it (a = x w1[e]ᵀ, b = x w3[e]ᵀ, h = swiglu(a, b)
    with the registry's kernel, y = h w2[e]ᵀ; rows grouped by expert) and
    the combine Σ_j w_j y_j in slot order from zero, as CombineRows adds them. Differences from the module,
    none in the values: one token (a decoding step) takes `_one_token`, whose a and b are two GEMVs (equal
    to the module's one-row product by the stacked [w1; w3]; for n > 1 rows the two round differently on the
    98M benchmark model, so more tokens take the stacked GEMM, as the module); the blocks run one after
    another on the calling thread (no pool, no BLAS thread switching: a short prompt's blocks are a few rows);
    one swiglu call covers every block. (Running one token's two experts on two threads was measured 0.5 ms
    per step slower on the 98M benchmark model, 2 cores: waking a thread costs more than a GEMV.)"""
    router_weight, router_bias, top_k, normalize, groups, w1, w3, w2 = arrays
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1 and groups is None and rows.dtype == router_weight.dtype:
        return _one_token(arrays, rows).reshape(x.shape)
    logits = LinearOp.forward(ctx, rows.astype(router_weight.dtype), router_weight, router_bias)
    _, weights, expert_ids = SoftmaxTopK.forward(ctx, logits, top_k, normalize, groups)
    weights = weights.astype(rows.dtype)
    n_tokens, d_ff = expert_ids.shape[0], w1.shape[1]
    slots = expert_ids.reshape(-1)
    order = np.argsort(slots, kind="stable")  # the plan's rows: by expert, then by (token, slot)
    dispatched = rows[order // top_k]
    ends = np.cumsum(np.bincount(slots, minlength=w1.shape[0])).tolist()
    blocks = [(expert, start, stop) for expert, (start, stop) in enumerate(zip([0] + ends[:-1], ends)) if stop > start]
    gate_up = np.empty((dispatched.shape[0], 2 * d_ff), rows.dtype)
    joint = joint_gate_up(w1, w3)  # [w1; w3] per expert as a view where the layer keeps them so
    for expert, start, stop in blocks:
        stacked = joint[expert] if joint is not None else np.concatenate((w1[expert], w3[expert]))
        np.matmul(dispatched[start:stop], stacked.T, out=gate_up[start:stop])
    hidden = implementation(rows).swiglu(gate_up[:, :d_ff], gate_up[:, d_ff:])
    expert_out = np.empty(dispatched.shape, rows.dtype)
    for expert, start, stop in blocks:
        np.matmul(hidden[start:stop], w2[expert].T, out=expert_out[start:stop])
    row_of_slot = np.empty_like(order)
    row_of_slot[order] = np.arange(order.size)
    row_of_slot = row_of_slot.reshape(n_tokens, top_k)
    out = np.zeros_like(rows)
    for slot in range(top_k):
        out += weights[:, slot:slot + 1] * expert_out[row_of_slot[:, slot]]
    return out.reshape(x.shape)

