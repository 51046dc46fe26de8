"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""
from __future__ import annotations

import math

from ..engine.checks import require_int
from .optimizer import check_hyperparameter


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """lr at `step` (0-based): base·(step+1)/warmup during warm-up, then
    min + (base − min)·(1 + cos(π·progress))/2 with progress from 0 to 1 over the remaining steps.

    Needs 0 <= min_lr <= base_lr (a floor above the peak is refused, never clamped)."""
    _check_lengths(warmup_steps, total_steps, "warmup_cosine")
    require_int(step, "step", "warmup_cosine", low=0)
    base_lr = check_hyperparameter(base_lr, "base_lr", "warmup_cosine", low=0.0)
    min_lr = check_hyperparameter(min_lr, "min_lr", "warmup_cosine", low=0.0, high=base_lr)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each parameter group's lr from `warmup_cosine` of that group's own starting lr, each time `step()`
    is called (once per training step). `min_lr` is one floor shared by all groups (as in torch)."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
        _check_lengths(warmup_steps, total_steps, "WarmupCosine")
        min_lr = check_hyperparameter(min_lr, "min_lr", "WarmupCosine", low=0.0)
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        _check_floor(min_lr, self.base_lrs, "WarmupCosine")
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.step_index = 0
        self._apply()

    def current(self) -> list:
        """The learning rate of every group at the current step."""
        return [warmup_cosine(self.step_index, base_lr, self.warmup_steps, self.total_steps, self.min_lr)
                for base_lr in self.base_lrs]

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.current()):
            group["lr"] = lr

    def step(self) -> None:
        self.step_index += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Restore step_index and base_lrs; ValueError/TypeError naming the entry when they do not fit."""
        if not isinstance(state, dict) or not {"step_index", "base_lrs"} <= set(state):
            raise ValueError(f"schedule state must be a dict with step_index and base_lrs, got {state!r:.80}")
        step_index = require_int(state["step_index"], "step_index", "WarmupCosine.load_state_dict", low=0)
        if not isinstance(state["base_lrs"], (list, tuple)):
            raise ValueError(f"schedule state base_lrs={state['base_lrs']!r:.80} must be a list")
        base_lrs = [check_hyperparameter(lr, "base_lrs", "WarmupCosine.load_state_dict", low=0.0)
                    for lr in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"schedule state has {len(base_lrs)} group learning rate(s), the optimizer "
                             f"{len(self.optimizer.param_groups)} group(s)")
        _check_floor(self.min_lr, base_lrs, "WarmupCosine.load_state_dict")
        self.step_index, self.base_lrs = step_index, base_lrs
        self._apply()


def _check_lengths(warmup_steps, total_steps, op) -> None:
    require_int(warmup_steps, "warmup_steps", op, low=0)
    require_int(total_steps, "total_steps", op, low=1)


def _check_floor(min_lr, base_lrs, op) -> None:
    for index, base_lr in enumerate(base_lrs):
        if min_lr > base_lr:
            raise ValueError(f"{op}: min_lr={min_lr!r} is above the learning rate {base_lr!r} of parameter group "
                             f"{index}; the floor must be <= every group's lr (lower min_lr or raise lr)")
