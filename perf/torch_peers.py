"""The two PyTorch peers of perf/bench_moe.py (eager mode, written the way real code does it).

Both compute the same layer as tinymoe's MoE(router="softmax", normalize_top_k=True, activation="swiglu",
dropless) plus its load-balance loss, from the same weights (any float dtype; the router in float32 at least):
    transformers_style  loop over experts, torch.where per expert, index_add_ to combine (MixtralSparseMoeBlock)
    sort_based          stable argsort of the expert ids, one gather, contiguous per-expert matmuls, index_add_
"""
import torch
import torch.nn.functional as F


def _route(x, router_weight, top_k):
    logits = x @ router_weight.T
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # >= float32
    top_probs, expert_ids = torch.topk(probs, top_k, dim=-1)
    weights = (top_probs / top_probs.sum(dim=-1, keepdim=True)).to(x.dtype)
    return probs, weights, expert_ids


def _aux_loss(probs, expert_ids, n_experts):
    fraction = torch.bincount(expert_ids.reshape(-1), minlength=n_experts).to(probs.dtype) / expert_ids.numel()
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def transformers_style(x, router_weight, w1, w3, w2, top_k):
    """x (T, d); w1, w3 (E, ff, d); w2 (E, d, ff) → (out (T, d), aux)."""
    n_experts = w1.shape[0]
    probs, weights, expert_ids = _route(x, router_weight, top_k)
    out = torch.zeros_like(x)
    for expert in range(n_experts):
        token, slot = torch.where(expert_ids == expert)
        if token.numel() == 0:
            continue
        rows = x[token]
        hidden = F.silu(rows @ w1[expert].T) * (rows @ w3[expert].T)
        out.index_add_(0, token, (hidden @ w2[expert].T) * weights[token, slot, None])
    return out, _aux_loss(probs, expert_ids, n_experts)


def sort_based(x, router_weight, w1, w3, w2, top_k):
    n_experts = w1.shape[0]
    probs, weights, expert_ids = _route(x, router_weight, top_k)
    flat_experts = expert_ids.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token = order // top_k
    counts = torch.bincount(flat_experts, minlength=n_experts).tolist()
    rows = x[token]
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            block = rows[start:start + count]
            pieces.append((F.silu(block @ w1[expert].T) * (block @ w3[expert].T)) @ w2[expert].T)
        start += count
    expert_out = torch.cat(pieces) * weights.reshape(-1)[order, None]
    out = torch.zeros_like(x).index_add_(0, token, expert_out)
    return out, _aux_loss(probs, expert_ids, n_experts)


PEERS = {"torch-loop": transformers_style, "torch-sort": sort_based}  # the row names of bench_moe.py
