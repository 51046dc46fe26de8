"""Adaptive-compute gates: a token uses a variable number of experts. Each returns, like the gates of gating.py,

    probs      (T, E)  the router's distribution (for the load-balance loss and the statistics)
    weights    (T, K)  combine weight of each slot (0 where the slot is not used)
    expert_ids (T, K)  int, the expert of each slot (a plain array: selection has no gradient)
    valid      (T, K)  bool, the slots a token really uses: the routing plan skips the others (no rows, no FLOPs)

    TopPGate   top-p ("dynamic") routing   Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing
                                           in MoE Models" (ACL 2024)
    ReLUGate   ReLU routing                Wang et al. 2025, "ReMoE: Fully Differentiable Mixture-of-Experts
                                           with ReLU Routing" (ICLR 2025)

Null experts (AdaMoE, Zeng et al. 2024) need no gate of their own: `null_expert_mask` turns the slots of a
softmax top-k over E + m outputs that chose one of the m null experts into invalid slots.
"""
from __future__ import annotations

from ..engine.backend import array_module
from ..engine.array_math import softmax, softmax_backward, stable_top_k
from ..engine.function import Function
from .gating import _scatter_rows, every_expert_outputs


class TopPGate(Function):
    """Top-p routing (Huang et al. 2024, sec. 3.1): p = softmax(z); order the experts by p, largest first, and
    take them until the cumulative sum of the chosen p reaches the threshold:

        slot j of token t is used  ⇔  j = 0  or  Σ_{i<j} p_t,(i) < threshold       (p_t,(i): i-th largest)

    capped at k slots (the paper has no cap; tinymoe bounds the slots by top_k so K is fixed). Weights are the
    raw chosen probabilities, NOT renormalised: the paper's output is Σ_{e∈S} p_e · expert_e(x) (eq. 5), so a
    token that needs few experts also gets a smaller total weight. Unused slots get weight 0.
    Backward: dz = softmax'(p; dp + scatter(ids, dw · valid)).
    """

    @staticmethod
    def forward(ctx, logits, k, threshold):
        xp = ctx.xp
        probs = softmax(logits, axis=1)
        expert_ids = stable_top_k(logits, k)
        chosen = xp.take_along_axis(probs, expert_ids, axis=1)
        mass_before = xp.cumsum(chosen, axis=1) - chosen  # Σ of the slots before j
        valid = mass_before < threshold
        valid[:, 0] = True
        weights = xp.where(valid, chosen, 0)
        ctx.save_for_backward(probs, expert_ids, valid)
        return probs, weights, expert_ids, valid

    @staticmethod
    def backward(ctx, grad_probs, grad_weights):
        probs, expert_ids, valid = ctx.saved_tensors
        through_weights = _scatter_rows(ctx.xp, probs.shape, expert_ids, ctx.xp.where(valid, grad_weights, 0))
        return softmax_backward(probs, grad_probs + through_weights, axis=1)


class ReLUGate(Function):
    """ReLU routing (ReMoE, Wang et al. 2025, eq. 4): gate_te = relu(z_te), no top-k; token t uses every expert
    with a positive gate (0..E of them): expert_ids (T, E) = e, valid = z > 0, weights = relu(z).

    probs = softmax(z) is returned for the batch load-balance loss and the statistics only (ReMoE balances
    with its L1 penalty, see adaptive_losses.ReLUSparsityLoss); it does not enter the combine.
    Backward: dz = softmax'(p; dp) + dw · [z > 0].
    """

    @staticmethod
    def forward(ctx, logits):
        valid = logits > 0
        return every_expert_outputs(ctx, softmax(logits, axis=1), valid, ctx.xp.where(valid, logits, 0))

    @staticmethod
    def backward(ctx, grad_probs, grad_weights):
        probs, valid = ctx.saved_tensors
        return softmax_backward(probs, grad_probs, axis=1) + ctx.xp.where(valid, grad_weights, 0)


def null_expert_mask(expert_ids, n_experts):
    """(valid, plan_ids) for a top-k over E real + m null outputs (AdaMoE, Zeng et al. 2024): valid = ids < E;
    plan_ids = ids where valid, else 0 (a placeholder the routing plan never reads: the slot is invalid)."""
    valid = expert_ids < n_experts
    return valid, array_module(expert_ids).where(valid, expert_ids, 0)
