"""Auxiliary losses of a router, each a Function with its hand-written backward.

    load_balance  aux = E · Σ_e f_e · P_e                (Switch Transformer eq. 4–6, generalised to top-k)
    z_loss        z   = mean_t (logsumexp_e z_te)²       (ST-MoE, Zoph et al. 2022, eq. 5)
    importance    CV²(Σ_t gate_te)                       (Shazeer et al. 2017, eq. 6–7)
    load          CV²(Σ_t Φ((z_te − threshold_te)/σ_te)) (Shazeer et al. 2017, appendix A, eq. 8–10)

f_e: fraction of the assignments that chose expert e (counted from the routing, no gradient);
P_e = mean_t p_te: mean router probability. A perfectly balanced router has f = P = 1/E, so aux = 1 for
any k. (transformers' `load_balancing_loss_func` for Mixtral sums f over the k slots, which is k times
this; divide its value by k to compare.) CV²(v) = Var(v) / (mean(v)² + 1e-10), population variance.
"""
from __future__ import annotations

from ..engine.array_math import ignore_float_errors, logsumexp, normal_cdf, normal_pdf, sigmoid, softmax, softplus, stable_argsort
from ..engine.basic_ops import scatter_add
from ..engine.function import Function

CV_EPSILON = 1e-10


class LoadBalanceLoss(Function):
    """aux = E · Σ_e f_e · mean_t p_te;  dp_te = g · E · f_e / T (the gradient flows through P only)."""

    @staticmethod
    def forward(ctx, probs, assignment_fraction):
        n_tokens, n_experts = probs.shape
        ctx.scale = assignment_fraction * (n_experts / n_tokens)
        ctx.shape, ctx.dtype = probs.shape, probs.dtype
        return (probs.sum(axis=0) * ctx.scale).sum()

    @staticmethod
    def backward(ctx, grad):
        return ctx.xp.broadcast_to((grad * ctx.scale).astype(ctx.dtype), ctx.shape)


class ZLoss(Function):
    """z = mean_t lse_t², lse_t = logsumexp_e z_te;  dz_te = g · 2 · lse_t · softmax(z_t)_e / T."""

    @staticmethod
    def forward(ctx, logits):
        lse = logsumexp(logits, axis=1)
        ctx.save_for_backward(logits, lse)
        return (lse * lse).mean()

    @staticmethod
    def backward(ctx, grad):
        logits, lse = ctx.saved_tensors
        return softmax(logits, axis=1) * (grad * 2 * lse / logits.shape[0])[:, None]


def cv_squared(values):
    """(CV², dCV²/dvalues) of a 1-D array: Var/(mean² + ε), population variance."""
    n = values.shape[0]
    mean = values.mean()
    variance = ((values - mean) ** 2).mean()
    denominator = mean * mean + CV_EPSILON
    grad = 2 * (values - mean) / (n * denominator) - variance * 2 * mean / (n * denominator * denominator)
    return variance / denominator, grad


class ImportanceLoss(Function):
    """CV² of importance_e = Σ_t gate_te, with gate_te the combine weight of expert e for token t.

    weights (T, K), expert_ids (T, K);  dweights[t, j] = g · dCV²/dimportance[expert_ids[t, j]].
    """

    @staticmethod
    def forward(ctx, weights, expert_ids, n_experts):
        importance = ctx.xp.bincount(expert_ids.reshape(-1), weights=weights.reshape(-1), minlength=n_experts)
        loss, grad_importance = cv_squared(importance.astype(weights.dtype))
        ctx.save_for_backward(grad_importance, expert_ids)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad_importance, expert_ids = ctx.saved_tensors
        return grad * grad_importance[expert_ids]


class NoisyLoadLoss(Function):
    """CV² of the smooth load estimate of noisy top-k gating (Shazeer et al. 2017, appendix A).

    σ = softplus(z_noise);  H = z + ε·σ (ε = 0 in eval);
    P_te = Φ((z_te − thr_te) / σ_te), thr_te = the (k+1)-th largest H_t· if e is in token t's top-k,
    else the k-th largest: the probability that e stays in the top-k under fresh noise on H_te alone.
    load_e = Σ_t P_te;  loss = CV²(load).
    Backward, with c = dloss/dload_e · φ(u)/σ_te and u = (z_te − thr_te)/σ_te:
    dz_te += c; dz_noise_te −= c · u · σ'(z_noise_te); and through thr_te = H_tj:
    dz_tj −= c; dz_noise_tj −= c · ε_tj · σ'(z_noise_tj), where σ' = sigmoid.
    """

    @staticmethod
    def forward(ctx, clean_logits, noise_logits, noise, k):
        xp = ctx.xp
        n_tokens, n_experts = clean_logits.shape
        scale = softplus(noise_logits)
        noisy = clean_logits + noise * scale
        # σ may underflow to 0 (z_noise ≲ −745); the smallest normal number keeps u finite (Φ is then 0 or 1).
        scale = xp.maximum(scale, xp.finfo(scale.dtype).tiny)
        order = stable_argsort(-noisy, axis=1)
        kth, next_after = order[:, k - 1:k], order[:, k:k + 1]  # (T, 1) column of the k-th, (k+1)-th largest
        in_top_k = noisy >= xp.take_along_axis(noisy, kth, axis=1)
        threshold_column = xp.where(in_top_k, next_after, kth)  # (T, E) which H_tj is e's threshold
        threshold = xp.take_along_axis(noisy, threshold_column, axis=1)
        # Beyond |u| = 50, Φ is exactly 0 or 1 and φ exactly 0 in float64: clipping keeps u·φ(u) at 0, not inf·0.
        with ignore_float_errors(xp):
            standardized = xp.clip((clean_logits - threshold) / scale, -50.0, 50.0)
        load = normal_cdf(standardized).sum(axis=0)
        loss, grad_load = cv_squared(load)
        ctx.save_for_backward(noise_logits, noise, scale, standardized, threshold_column, grad_load)
        return loss

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        noise_logits, noise, scale, standardized, threshold_column, grad_load = ctx.saved_tensors
        scale_slope = sigmoid(noise_logits)
        c = grad * grad_load[None, :] * normal_pdf(standardized) / scale
        grad_clean = c.copy()
        grad_noise = -c * standardized * scale_slope
        # Each threshold H_tj feeds several experts e of token t: sum c over them into column j.
        through_threshold = xp.zeros_like(c)
        rows = xp.broadcast_to(xp.arange(c.shape[0])[:, None], c.shape)
        scatter_add(xp, through_threshold, (rows, threshold_column), c)
        grad_clean -= through_threshold
        grad_noise -= through_threshold * noise * scale_slope
        return grad_clean, grad_noise
