"""Plain NumPy references for the MoE layer, written from issue 3's formulas and the papers — not from tinymoe's code.

Everything here is float64 and goes one token (or one expert) at a time with Python loops wherever the rule is a
loop (capacity, expert choice, kth_excluding), so each line can be checked against the issue by reading it:

    expert e (SwiGLU):   w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))
    expert e (MLP):      w2[e] @ act(w1[e] @ x + b1[e]) + b2[e]
    token choice:        ids = top-k of the scores; weights = p_ids / Σ p_ids (normalize) or p_ids (Switch)
    capacity:            C = ceil(cf · T · k / E); choice rank first, then token order; each expert keeps its first C
    expert choice:       C = ceil(cf · T / E); each expert takes its top-C tokens by p = softmax(z)
    aux:                 E · Σ_e f_e · P_e       z-loss: mean_t logsumexp(z_t)²
    noisy load:          P_te = Φ((z_te − kth_excluding(H_t, k, e)) / σ_te)   (Shazeer et al. 2017, appendix A)
"""
import math

import numpy as np

from helpers import host

_ERF = np.vectorize(math.erf, otypes=[np.float64])


def softmax(z):
    shifted = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def logsumexp(z):
    peak = np.max(z, axis=-1, keepdims=True)
    return (peak + np.log(np.exp(z - peak).sum(axis=-1, keepdims=True)))[..., 0]


def sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(a, dtype=np.float64)))


def silu(a):
    return a * sigmoid(a)


def softplus(a):
    return np.logaddexp(0.0, a)


def normal_cdf(u):
    return 0.5 * (1.0 + _ERF(np.asarray(u, dtype=np.float64) / math.sqrt(2.0)))


ACTIVATIONS = {
    "relu": lambda a: np.maximum(a, 0.0),
    "silu": silu,
    "gelu": lambda a: a * normal_cdf(a),  # exact GELU: x·Φ(x)
}


def parameters(moe):
    """Every parameter and buffer of `moe` as a float64 NumPy array, by dotted name."""
    arrays = {name: host(value).astype(np.float64) for name, value in moe.named_parameters()}
    arrays.update({name: host(value).astype(np.float64) for name, value in moe.named_buffers()})
    return arrays


def top_k(scores, k):
    """The k largest entries of a 1-D array, largest first (ties, if any, to the lower index)."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))[:k]


def expert_output(params, activation, expert, x_t):
    """One expert on one token x_t (d,) → (d,)."""
    w1, w2 = params["experts.w1"][expert], params["experts.w2"][expert]
    if activation == "swiglu":
        return w2 @ (silu(w1 @ x_t) * (params["experts.w3"][expert] @ x_t))
    return w2 @ ACTIVATIONS[activation](w1 @ x_t + params["experts.b1"][expert]) + params["experts.b2"][expert]


def all_expert_outputs(params, activation, x):
    """(E, T, d): every expert on every token."""
    n_experts = params["experts.w1"].shape[0]
    return np.stack([np.stack([expert_output(params, activation, e, x_t) for x_t in x]) for e in range(n_experts)])


def shared_output(params, x_t):
    """Always-on shared SwiGLU experts (zero when the layer has none)."""
    if "shared.w1" not in params:
        return np.zeros_like(x_t)
    return params["shared.w2"] @ (silu(params["shared.w1"] @ x_t) * (params["shared.w3"] @ x_t))


def router_logits(params, x):
    return x @ params["router.weight"].T


def token_choice(params, x, k, activation="swiglu", gate="softmax", normalize=True, capacity_factor=None,
                 bias=None, logits=None):
    """The layer's output and routing for token-choice gates, by the issue's rules. x (T, d) float64.

    gate "softmax": p = softmax(z), ids = top-k of p, w = p_ids (/ Σ p_ids when normalize).
    gate "sigmoid": s = σ(z), ids = top-k of s + bias, w = s_ids (/ Σ s_ids when normalize), bias never in w.
    """
    x = np.asarray(x, dtype=np.float64)
    n_tokens = x.shape[0]
    z = router_logits(params, x) if logits is None else np.asarray(logits, dtype=np.float64)
    n_experts = z.shape[1]
    expert_ids = np.zeros((n_tokens, k), dtype=np.int64)
    weights = np.zeros((n_tokens, k))
    probs = softmax(z) if gate == "softmax" else sigmoid(z)
    for t in range(n_tokens):
        if gate == "softmax":
            chosen = top_k(probs[t], k)
        else:
            chosen = top_k(probs[t] + (0.0 if bias is None else bias), k)
        expert_ids[t] = chosen
        raw = probs[t, chosen]
        weights[t] = raw / raw.sum() if normalize else raw

    capacity = None if capacity_factor is None else math.ceil(capacity_factor * n_tokens * k / n_experts)
    kept = np.zeros((n_tokens, k), dtype=bool)
    taken = [0] * n_experts
    for j in range(k):                 # all first choices, then all second choices, ...
        for t in range(n_tokens):      # ... each in token order
            e = expert_ids[t, j]
            if capacity is None or taken[e] < capacity:
                kept[t, j] = True
                taken[e] += 1

    y = np.zeros_like(x)
    for t in range(n_tokens):
        y[t] = shared_output(params, x[t])
        for j in range(k):
            if kept[t, j]:  # a dropped assignment contributes nothing; the others are not renormalised
                y[t] += weights[t, j] * expert_output(params, activation, expert_ids[t, j], x[t])
    requested = np.bincount(expert_ids.reshape(-1), minlength=n_experts)
    return {
        "y": y, "logits": z, "probs": probs, "expert_ids": expert_ids, "weights": weights, "kept": kept,
        "capacity": capacity, "requested_per_expert": requested, "tokens_per_expert": np.array(taken),
        "dropped_fraction": 1.0 - kept.sum() / kept.size,
    }


def expert_choice(params, x, capacity_factor, activation="swiglu"):
    """Zhou et al. 2022: p = softmax(z) over experts; expert e takes its C = ceil(cf·T/E) highest-p tokens;
    y_t = Σ over the experts that took t of p_te · expert_e(x_t)."""
    x = np.asarray(x, dtype=np.float64)
    n_tokens = x.shape[0]
    probs = softmax(router_logits(params, x))
    n_experts = probs.shape[1]
    capacity = math.ceil(capacity_factor * n_tokens / n_experts)
    picked = np.zeros((n_tokens, n_experts), dtype=bool)
    for e in range(n_experts):
        for t in top_k(probs[:, e], capacity):
            picked[t, e] = True
    y = np.zeros_like(x)
    for t in range(n_tokens):
        y[t] = shared_output(params, x[t])
        for e in range(n_experts):
            if picked[t, e]:
                y[t] += probs[t, e] * expert_output(params, activation, e, x[t])
    return {"y": y, "probs": probs, "picked": picked, "capacity": capacity,
            "dropped_fraction": float(np.mean(~picked.any(axis=1)))}


def aux_loss(probs, expert_ids):
    """Switch eq. 4–6 generalised to top-k: f_e = share of the T·k assignments on e, P_e = mean_t p_te."""
    n_experts = probs.shape[1]
    fraction = np.bincount(np.asarray(expert_ids).reshape(-1), minlength=n_experts) / np.asarray(expert_ids).size
    return n_experts * float((fraction * probs.mean(axis=0)).sum())


def aux_loss_logit_grad(logits, expert_ids):
    """d aux / d z with f held fixed (the gradient flows through P only):
    ∂/∂z_te of (E/T) Σ_t' Σ_e' f_e' p_t'e' = (E/T) · p_te · (f_e − Σ_e' f_e' p_te')."""
    n_tokens, n_experts = logits.shape
    probs = softmax(logits)
    fraction = np.bincount(np.asarray(expert_ids).reshape(-1), minlength=n_experts) / np.asarray(expert_ids).size
    return (n_experts / n_tokens) * probs * (fraction[None, :] - (probs * fraction[None, :]).sum(axis=1, keepdims=True))


def z_loss(logits):
    """ST-MoE: mean_t (logsumexp_e z_te)²."""
    return float(np.mean(logsumexp(logits) ** 2))


def z_loss_logit_grad(logits):
    """d/dz_te of mean_t lse_t² = 2 · lse_t · softmax(z_t)_e / T."""
    return 2.0 * logsumexp(logits)[:, None] * softmax(logits) / logits.shape[0]


def cv_squared(values):
    """Coefficient of variation squared, population variance (tensor2tensor's cv_squared)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.var() / values.mean() ** 2)


def importance_loss(weights, expert_ids, n_experts):
    """Shazeer et al. 2017 eq. 6–7: Importance_e = Σ_t G(x_t)_e, loss = CV(Importance)²."""
    importance = np.zeros(n_experts)
    for t in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            importance[expert_ids[t, j]] += weights[t, j]
    return cv_squared(importance)


def noisy_load_loss(clean_logits, noise_logits, noise, k, noise_floor):
    """Shazeer et al. 2017 appendix A, eq. 8–10, one (t, e) at a time:
    σ = softplus(x·Wn) + floor; H = z + ε·σ; P_te = Φ((z_te − kth_excluding(H_t, k, e)) / σ_te);
    Load_e = Σ_t P_te; loss = CV(Load)². kth_excluding(v, k, e): the k-th largest entry of v other than v_e."""
    n_tokens, n_experts = clean_logits.shape
    scale = softplus(noise_logits) + noise_floor
    noisy = clean_logits + noise * scale
    load = np.zeros(n_experts)
    for t in range(n_tokens):
        for e in range(n_experts):
            others = sorted((noisy[t, j] for j in range(n_experts) if j != e), reverse=True)
            threshold = others[k - 1]
            load[e] += normal_cdf((clean_logits[t, e] - threshold) / scale[t, e])
    return cv_squared(load)


def entropy_and_top1(probs):
    """(mean_t −Σ_e p log p, mean_t max_e p)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    return float(-terms.sum(axis=1).mean()), float(probs.max(axis=1).mean())
