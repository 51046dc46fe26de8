"""Losses of the adaptive routers and of the balance options, each a Function with its hand-written backward.

    entropy         H = mean_t −Σ_e p_te log p_te            dynamic loss of top-p routing (Huang et al. 2024, eq. 7)
    relu_sparsity   λ · mean_t Σ_e relu(z_te)                ReMoE's L1 penalty (Wang et al. 2025, eq. 6)
    sequence        mean_b E · Σ_e f_be · P_be                DeepSeek-V3 report eq. 17–20 (per-sequence balance)

Global-batch balance (Qiu et al. 2025, arXiv 2501.11873) needs no new Function: it is router_losses'
LoadBalanceLoss with f_e counted over every micro-batch (and rank) of the optimizer step.
"""
from __future__ import annotations

from ..engine.array_math import softmax
from ..engine.backend import array_module
from ..engine.function import Function


class EntropyLoss(Function):
    """H = mean_t H_t, H_t = −Σ_e p_te log p_te with p = softmax(z), computed as H_t = lse_t − Σ_e p_te z_te (finite
    when some p underflow to 0). Huang et al. 2024's dynamic loss: minimising it makes the router confident, so
    top-p takes fewer experts. Backward: dz_te = −g · p_te (z_te − Σ_j p_tj z_tj) / T.
    """

    @staticmethod
    def forward(ctx, logits):
        xp = ctx.xp
        probs = softmax(logits, axis=1)
        peak = logits.max(axis=1, keepdims=True)
        shifted = logits - peak  # entropy is shift-invariant; shifting keeps exp finite
        lse = xp.log(xp.exp(shifted).sum(axis=1))
        mean_logit = (probs * shifted).sum(axis=1)
        ctx.save_for_backward(probs, shifted, mean_logit)
        return (lse - mean_logit).mean()

    @staticmethod
    def backward(ctx, grad):
        probs, shifted, mean_logit = ctx.saved_tensors
        return -(grad / probs.shape[0]) * probs * (shifted - mean_logit[:, None])


class ReLUSparsityLoss(Function):
    """λ · L_reg with L_reg = (1/T) Σ_t Σ_e relu(z_te) (ReMoE eq. 6, one layer; the paper also averages over
    layers, which a model does by averaging the layers' l1_loss). λ is a constant here (adapted outside the
    graph, see Router.update_l1_coefficient). Backward: dz_te = g · λ · [z_te > 0] / T.
    """

    @staticmethod
    def forward(ctx, logits, coefficient):
        xp = ctx.xp
        active = logits > 0
        ctx.scale, ctx.active, ctx.dtype = coefficient / logits.shape[0], active, logits.dtype
        return xp.where(active, logits, 0).sum() * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        return ctx.xp.where(ctx.active, grad * ctx.scale, 0).astype(ctx.dtype)


class SequenceBalanceLoss(Function):
    """Complementary sequence-wise balance loss (DeepSeek-V3 technical report, eq. 17–20), averaged over sequences:

        loss = (1/B) Σ_b E · Σ_e f_be · P_be,   P_be = (1/L) Σ_{t in b} p_te,   f_be = fraction of sequence b's
        assignments that chose e (a constant). DeepSeek-V3 writes f_be = E/(K·L) · count_be and the loss
        α Σ f·P; that is E · Σ (count/(K·L)) · P, this formula with K·L assignments per sequence.

    probs (B·L, E) with the tokens of sequence b in rows b·L … b·L + L − 1; fractions (B, E).
    Backward: dp_te = g · E · f_{b(t)e} / (B · L).
    """

    @staticmethod
    def forward(ctx, probs, fractions):
        n_sequences, n_experts = fractions.shape
        length = probs.shape[0] // n_sequences
        per_sequence = probs.reshape(n_sequences, length, n_experts).sum(axis=1)  # (B, E) = L · P_be
        ctx.scale = fractions * (n_experts / (n_sequences * length))
        ctx.shape = (n_sequences, length, n_experts)
        return (per_sequence * ctx.scale).sum()

    @staticmethod
    def backward(ctx, grad):
        n_sequences, length, n_experts = ctx.shape
        grad_probs = ctx.xp.broadcast_to((grad * ctx.scale)[:, None, :], ctx.shape)
        return grad_probs.reshape(n_sequences * length, n_experts)


def assignment_fractions(expert_ids, valid, n_outputs: int, n_groups: int = 1):
    """(n_groups, n_outputs) fraction of each group's valid assignments choosing each output; the tokens (rows of
    expert_ids (T, K)) are split into n_groups equal, contiguous groups. valid (T, K) bool or None (all)."""
    xp = array_module(expert_ids)
    n_tokens, n_slots = expert_ids.shape
    group = xp.broadcast_to((xp.arange(n_tokens) // (n_tokens // n_groups))[:, None], (n_tokens, n_slots))
    keys = group * n_outputs + expert_ids
    keys = keys.reshape(-1) if valid is None else keys[valid]
    counts = xp.bincount(keys, minlength=n_groups * n_outputs).reshape(n_groups, n_outputs)
    return counts / xp.maximum(counts.sum(axis=1, keepdims=True), 1)

