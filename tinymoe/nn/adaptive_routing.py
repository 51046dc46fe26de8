"""The router's adaptive-compute branches and balance options, kept out of router.py (which calls them).

    router="top_p"       TopPGate + entropy loss                   Huang et al. 2024
    n_null_experts = m   softmax top-k over E + m outputs, null slots invalid   AdaMoE, Zeng et al. 2024
    router="relu"        ReLUGate + adaptive L1 penalty            ReMoE, Wang et al. 2025
    balance              "batch" | "sequence" | "global"           Switch | DeepSeek-V3 eq. 17–20 | Qiu et al. 2025

Deferred updates (gradient accumulation, train/accumulation.py). The router's non-gradient updates (the
sigmoid router's aux-free bias, the ReLU router's L1 coefficient) run at the end of each training forward by
default, as before. With `router.defer_updates = True` a training forward only adds what it saw to
`router.pending_load` (sigmoid: assignments per expert) or `router.pending_gates` (relu: active gates, gates),
and `update_bias()` / `update_l1_coefficient()` consume the sums once per optimizer step.

Global balance: `router.global_load` (n_outputs,) counts, when set (by train/accumulation.py, summed over the
micro-batches of the step and all ranks), replace the forward's own counts in f_e; the batch's P_e is kept.
When it is None, balance="global" counts this forward's assignments (a step of one micro-batch on one rank).
"""
from __future__ import annotations

import numpy as np

from ..engine.backend import to_numpy
from .adaptive_gating import ReLUGate, TopPGate, null_expert_mask
from .adaptive_losses import EntropyLoss, ReLUSparsityLoss, SequenceBalanceLoss, assignment_fractions
from .router_losses import LoadBalanceLoss


def init_adaptive_state(router, config) -> None:
    """The router's adaptive-routing state: update deferral, pending sums, global counts, the ReLU λ (a buffer,
    saved in checkpoints)."""
    router.n_null_experts, router.balance = config.n_null_experts, config.balance
    router.n_outputs = config.n_experts + config.n_null_experts
    router.defer_updates, router.pending_load, router.pending_gates, router.global_load = False, None, None, None
    router.last_sparsity, router.last_choice_counts = None, None
    if config.router == "relu":
        router.target_sparsity = (1 - config.top_k / config.n_experts if config.target_sparsity is None
                                  else config.target_sparsity)
        router.l1_update_factor = config.l1_update_factor
        router.register_buffer("l1_coefficient", router.weight.xp.asarray(config.l1_coefficient, dtype=np.float64))


def adaptive_gate(router, logits):
    """(probs, weights, expert_ids, valid, choice_ids, losses) of the top_p, relu or null-expert routers.

    choice_ids (T, K) are the ids over all n_outputs router outputs (null experts included) that the balance
    loss counts; expert_ids are what the routing plan gets (null slots invalid). losses: {"entropy_loss": ...}
    (top_p) or {"l1_loss": ...} (relu)."""
    if router.kind == "top_p":
        probs, weights, expert_ids, valid = TopPGate.apply(logits, router.top_k, router.config.top_p)
        return probs, weights, expert_ids, valid, expert_ids, {"entropy_loss": EntropyLoss.apply(logits)}
    if router.kind == "relu":
        probs, weights, expert_ids, valid = ReLUGate.apply(logits)
        l1_loss = ReLUSparsityLoss.apply(logits, float(router.l1_coefficient))
        _record_gates(router, valid)
        return probs, weights, expert_ids, valid, expert_ids, {"l1_loss": l1_loss}
    raise AssertionError(router.kind)  # null experts go through mask_null_experts


def mask_null_experts(router, expert_ids):
    """(plan_ids, valid) of a top-k over E + m outputs: slots that chose a null expert are invalid."""
    valid, plan_ids = null_expert_mask(expert_ids, router.n_experts)
    return plan_ids, valid


def balance_loss(router, probs, choice_ids, valid, sequence_length=None):
    """The load-balance loss of router.balance over probs (T, n_outputs) (null experts included: AdaMoE balances
    all E + m outputs, which is what keeps the average null usage, hence the compute, at its target).

    "batch": E'·Σ f_e P_e over the T tokens; "sequence": the same per sequence of sequence_length tokens,
    averaged (sequence_length None: all T tokens are one sequence); "global": f_e from router.global_load when
    set. choice_ids (T, K) count every chosen output (valid None: every slot)."""
    xp = probs.xp
    if router.balance == "sequence":
        length = probs.shape[0] if sequence_length is None else sequence_length  # None: one sequence
        if probs.shape[0] % length:
            raise ValueError(f"balance='sequence': {probs.shape[0]} tokens are not whole sequences of "
                             f"sequence_length={sequence_length}")
        n_sequences = probs.shape[0] // length
        fractions = assignment_fractions(choice_ids, valid, router.n_outputs, n_sequences)
        return SequenceBalanceLoss.apply(probs, fractions.astype(probs.dtype))
    if router.balance == "global" and router.global_load is not None:
        counts = xp.asarray(np.asarray(router.global_load, dtype=np.float64))
        fraction = counts / max(float(counts.sum()), 1.0)
    else:
        fraction = assignment_fractions(choice_ids, valid, router.n_outputs)[0]
    return LoadBalanceLoss.apply(probs, fraction.astype(probs.dtype))


def choice_counts(choice_ids, valid, n_outputs):
    """(n_outputs,) int64 host counts of the chosen outputs (what balance='global' sums over a step)."""
    ids = to_numpy(choice_ids if valid is None else choice_ids[valid]).reshape(-1)
    return np.bincount(ids, minlength=n_outputs).astype(np.int64)


# ----- deferred, non-gradient updates ------------------------------------------------------------------------
def record_load(router, load) -> bool:
    """Sigmoid router, training forward: add `load` (E,) to pending_load when updates are deferred. True when
    the caller should run the (old, per-forward) bias update now."""
    if router.defer_updates:
        router.pending_load = load if router.pending_load is None else router.pending_load + load
        return False
    return router.bias_update_rate is not None


def take_load(router):
    """The load update_bias() balances: the pending sum (then cleared) if any, else the last forward's."""
    if router.pending_load is not None:
        load, router.pending_load = router.pending_load, None
        return load
    return router.last_load


def _record_gates(router, valid) -> None:
    if not router.training:
        return
    active, total = int(to_numpy(valid.sum())), int(valid.size)
    router.last_sparsity = 1.0 - active / total
    if router.defer_updates:
        pending = router.pending_gates or (0, 0)
        router.pending_gates = (pending[0] + active, pending[1] + total)
    else:
        update_l1_coefficient(router)


def update_l1_coefficient(router) -> float:
    """ReMoE's controller (Wang et al. 2025, eq. 7): λ ← λ · α^{sign(target − S)}, S the fraction of zero gates
    seen since the last update (the pending sum, else the last training forward). Returns the new λ."""
    if router.kind != "relu":
        raise ValueError(f"update_l1_coefficient() applies to router='relu' only (this router is {router.kind!r})")
    if router.pending_gates is not None:
        active, total = router.pending_gates
        sparsity, router.pending_gates = 1.0 - active / total, None
    elif router.last_sparsity is not None:
        sparsity = router.last_sparsity
    else:
        raise RuntimeError("update_l1_coefficient() needs a training-mode forward first (it steers the sparsity "
                           "it saw)")
    step = np.sign(router.target_sparsity - sparsity)
    new = float(router.l1_coefficient) * router.l1_update_factor ** step
    router.l1_coefficient = router.weight.xp.asarray(new, dtype=np.float64)
    return float(router.l1_coefficient)
