"""Gates: from router logits z (T, E) to each token's experts and combine weights, with hand-written backward.

Every gate returns (probs, weights, expert_ids[, valid]):
    probs      (T, E)  the router's distribution over experts, used by the load-balance loss
    weights    (T, K)  combine weight of each chosen expert
    expert_ids (T, K)  int, the chosen experts (a plain array: selection has no gradient)
Selection is a stable top-k: equal scores go to the lower index, so routing is deterministic.
"""
from __future__ import annotations

from ..engine.array_math import sigmoid, softmax, softmax_backward, softplus, stable_top_k
from ..engine.function import Function


def _scatter_rows(xp, shape, expert_ids, values):
    """A (T, E) array holding values[t, j] at column expert_ids[t, j] (distinct per row), zeros elsewhere."""
    out = xp.zeros(shape, dtype=values.dtype)
    xp.put_along_axis(out, expert_ids, values, axis=1)
    return out


def group_limited_selection(xp, selection, scores, groups):
    """`selection` (T, E) with the experts outside each token's best groups set to −inf (DeepSeek-V3).

    groups = (n_groups, topk_groups) or None (selection returned as is). The E experts form n_groups equal
    groups of consecutive ids; group g scores Σ of the top-2 of scores[t, g] (for the sigmoid gate s + bias,
    for the softmax gate p); the topk_groups best groups (stable: ties to the lower group) stay eligible.
    No gradient: it only decides which experts may be picked.
    """
    if groups is None:
        return selection
    n_groups, topk_groups = groups
    n_tokens, n_experts = scores.shape
    grouped = xp.sort(scores.reshape(n_tokens, n_groups, n_experts // n_groups), axis=2)
    group_scores = grouped[:, :, -1] + grouped[:, :, -2]                  # (T, G): top-1 + top-2
    eligible_groups = xp.zeros((n_tokens, n_groups), dtype=bool)
    xp.put_along_axis(eligible_groups, stable_top_k(group_scores, topk_groups), True, axis=1)
    eligible = xp.repeat(eligible_groups, n_experts // n_groups, axis=1)  # (T, E)
    return xp.where(eligible, selection, -xp.inf)


class SoftmaxTopK(Function):
    """Token-choice softmax gate (Shazeer et al. 2017; Switch; Mixtral).

    p = softmax(z); ids = top-k of z; weights = softmax(z_ids) (normalize, Mixtral: p_ids / Σ p_ids)
    or p_ids (Switch). With k = E and normalize this is the dense mixture of Jacobs et al. (1991).
    groups=(n_groups, topk_groups): ids are picked among the experts of the best groups only (groups scored
    by their top-2 p; see group_limited_selection).
    Backward: dz = softmax'(p; dp) + scatter(ids, normalize ? w·(dw − Σ dw·w) : p_ids-path of dw).
    """

    @staticmethod
    def forward(ctx, logits, k, normalize, groups=None):
        xp = ctx.xp
        probs = softmax(logits, axis=1)
        expert_ids = stable_top_k(group_limited_selection(xp, logits, probs, groups), k)
        chosen = xp.take_along_axis(logits, expert_ids, axis=1)
        weights = softmax(chosen, axis=1) if normalize else xp.take_along_axis(probs, expert_ids, axis=1)
        ctx.save_for_backward(probs, weights, expert_ids)
        ctx.normalize = normalize
        return probs, weights, expert_ids

    @staticmethod
    def backward(ctx, grad_probs, grad_weights):
        xp = ctx.xp
        probs, weights, expert_ids = ctx.saved_tensors
        if ctx.normalize:
            grad_chosen = softmax_backward(weights, grad_weights, axis=1)
            return softmax_backward(probs, grad_probs, axis=1) + _scatter_rows(xp, probs.shape, expert_ids, grad_chosen)
        total = grad_probs + _scatter_rows(xp, probs.shape, expert_ids, grad_weights)
        return softmax_backward(probs, total, axis=1)


class SigmoidTopK(Function):
    """Sigmoid gate with the auxiliary-loss-free balance of DeepSeek-V3 (Wang et al. 2024).

    s = σ(z); ids = top-k of s + bias (the bias steers selection only); weights = s_ids / Σ s_ids
    (normalize) or s_ids. probs = s / Σ_e s (the normalised affinities, for the balance loss).
    groups=(n_groups, topk_groups): DeepSeek-V3's group-limited routing, groups scored by their top-2 s + bias
    (see group_limited_selection); weights still come from the unbiased s. (transformers divides by
    Σ s_ids + 1e-20; the softmax of log-scores below is s_ids / Σ s_ids, the same but for that 1e-20.)
    The ratios are computed from ℓ = log σ(z) = −softplus(−z) as softmaxes, so they stay finite when every
    σ(z) underflows (z ~ −1e4). Backward, with dℓ/dz = 1 − s:
    normalize: dℓ_ids = w·(dw − Σ dw·w), else dℓ_ids = dw·s_ids;  dℓ += p·(dp − Σ dp·p);  dz = dℓ·(1 − s).
    """

    @staticmethod
    def forward(ctx, logits, bias, k, normalize, groups=None):
        xp = ctx.xp
        scores = sigmoid(logits)
        log_scores = -softplus(-logits)
        biased = scores + bias
        expert_ids = stable_top_k(group_limited_selection(xp, biased, biased, groups), k)
        if normalize:
            weights = softmax(xp.take_along_axis(log_scores, expert_ids, axis=1), axis=1)
        else:
            weights = xp.take_along_axis(scores, expert_ids, axis=1)
        probs = softmax(log_scores, axis=1)
        ctx.save_for_backward(scores, probs, weights, expert_ids)
        ctx.normalize = normalize
        return probs, weights, expert_ids

    @staticmethod
    def backward(ctx, grad_probs, grad_weights):
        xp = ctx.xp
        scores, probs, weights, expert_ids = ctx.saved_tensors
        if ctx.normalize:
            grad_chosen = softmax_backward(weights, grad_weights, axis=1)
        else:
            grad_chosen = grad_weights * weights  # d s_ids / dℓ_ids = s_ids
        grad_log_scores = _scatter_rows(xp, scores.shape, expert_ids, grad_chosen)
        grad_log_scores += softmax_backward(probs, grad_probs, axis=1)
        return grad_log_scores * (1 - scores)


def every_expert_outputs(ctx, probs, valid, weights):
    """The outputs of a gate that may give a token any of the E experts: (probs, weights, expert_ids, valid) with
    expert_ids[t, e] = e (T, E) and `valid` (T, E) marking the pairs that exist; saves (probs, valid)."""
    n_tokens, n_experts = probs.shape
    expert_ids = ctx.xp.broadcast_to(ctx.xp.arange(n_experts), (n_tokens, n_experts))
    ctx.save_for_backward(probs, valid)
    return probs, weights, expert_ids, valid


class ExpertChoice(Function):
    """Expert-choice gate (Zhou et al. 2022): each expert takes its `capacity` highest-p tokens.

    p = softmax(z) over experts; chosen[t, e] = t among the top-C tokens of column p[:, e];
    weights (T, E) = p · chosen; expert_ids (T, E) = e; valid = chosen (a token gets 0..E experts).
    Backward: dz = softmax'(p; dp + dw · chosen).
    """

    @staticmethod
    def forward(ctx, logits, capacity):
        xp = ctx.xp
        probs = softmax(logits, axis=1)
        chosen = xp.zeros(probs.shape, dtype=bool)
        top_tokens = stable_top_k(probs, capacity, axis=0)  # (C, E)
        xp.put_along_axis(chosen, top_tokens, True, axis=0)
        return every_expert_outputs(ctx, probs, chosen, xp.where(chosen, probs, 0))

    @staticmethod
    def backward(ctx, grad_probs, grad_weights):
        probs, chosen = ctx.saved_tensors
        return softmax_backward(probs, grad_probs + grad_weights * chosen, axis=1)


class NoisyLogits(Function):
    """Noisy gating logits (Shazeer et al. 2017, eq. 4): H = z + ε · softplus(z_noise), ε ~ N(0, 1).

    (tensor2tensor's released code adds 0.01 to the noise scale; tinymoe follows the paper.)

    dz = g;  dz_noise = g · ε · σ(z_noise).
    """

    @staticmethod
    def forward(ctx, clean_logits, noise_logits, noise):
        ctx.save_for_backward(noise_logits, noise)
        return clean_logits + noise * softplus(noise_logits)

    @staticmethod
    def backward(ctx, grad):
        noise_logits, noise = ctx.saved_tensors
        return grad, grad * noise * sigmoid(noise_logits)
