"""SGD with momentum and Nesterov momentum (torch semantics)."""
from __future__ import annotations

from ..engine.checks import require_bool
from .optimizer import Optimizer, check_hyperparameter, check_hyperparameters


class SGD(Optimizer):
    """g ← ∇ + wd·p;  b ← μ·b + (1 − dampening)·g (b = g on the first step);
    d = g + μ·b (Nesterov) or b (momentum) or g (plain);  p ← p − lr·d.
    """

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay, "dampening": dampening})

    def check_group(self, group):
        check_hyperparameters(group["lr"], group["weight_decay"], "SGD")
        # momentum < 1: with mu >= 1 the buffer b = mu*b + g never forgets and grows without bound
        check_hyperparameter(group["momentum"], "momentum", "SGD", low=0.0, high=1.0, high_open=True)
        check_hyperparameter(group["dampening"], "dampening", "SGD", low=0.0, high=1.0)
        require_bool(group["nesterov"], "nesterov", "SGD")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: nesterov=True needs momentum > 0 and dampening = 0 (got momentum={group['momentum']}, "
                             f"dampening={group['dampening']})")

    def _update(self, parameter, grad, state, group):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * parameter.data
        momentum = group["momentum"]
        if momentum:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = grad.copy()
            else:
                buffer = state["momentum_buffer"]
                buffer *= momentum
                buffer += (1 - group["dampening"]) * grad
            buffer = state["momentum_buffer"]
            grad = grad + momentum * buffer if group["nesterov"] else buffer
        parameter.data -= group["lr"] * grad
