"""Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019: decoupled weight decay)."""
from __future__ import annotations

from .optimizer import Optimizer, check_hyperparameter, check_hyperparameters


class Adam(Optimizer):
    """m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  p ← p − lr · (m/(1−β1^t)) / (sqrt(v/(1−β2^t)) + eps),
    t counting the updates this parameter has had.

    Adam's weight_decay is L2 (added to g); AdamW's is decoupled: p ← p · (1 − lr·wd) before the step.
    """

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def check_group(self, group):
        op = type(self).__name__
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{op}: betas={betas!r} must be a pair (beta1, beta2)")
        check_hyperparameters(group["lr"], group["weight_decay"], op)
        for name, beta in zip(("beta1", "beta2"), betas):
            check_hyperparameter(beta, name, op, low=0.0, high=1.0, high_open=True)
        check_hyperparameter(group["eps"], "eps", op, low=0.0, low_open=True)

    def _update(self, parameter, grad, state, group):
        beta1, beta2 = group["betas"]
        if group["weight_decay"]:
            if self.decoupled:
                parameter.data *= 1 - group["lr"] * group["weight_decay"]
            else:
                grad = grad + group["weight_decay"] * parameter.data
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = parameter.xp.zeros_like(parameter.data)
            state["exp_avg_sq"] = parameter.xp.zeros_like(parameter.data)
        state["step"] += 1  # per parameter: one that had no gradient for a while still gets bias-corrected
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        xp = parameter.xp
        # The formula above, operation for operation (so bitwise the same as writing it out), into one scratch
        # buffer: an update allocates one array, not eight.
        scratch = xp.multiply(grad, 1 - beta1)
        exp_avg *= beta1
        exp_avg += scratch                                      # m ← β1·m + (1−β1)·g
        xp.multiply(grad, 1 - beta2, out=scratch)
        scratch *= grad
        exp_avg_sq *= beta2
        exp_avg_sq += scratch                                   # v ← β2·v + (1−β2)·g·g
        step = state["step"]
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        xp.divide(exp_avg_sq, bias_correction2, out=scratch)
        xp.sqrt(scratch, out=scratch)
        scratch += group["eps"]                                 # sqrt(v/(1−β2^t)) + eps
        xp.divide(xp.multiply(exp_avg, group["lr"] / bias_correction1), scratch, out=scratch)
        parameter.data -= scratch


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01, as in torch)."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
