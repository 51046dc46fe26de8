"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """lr at `step` (0-based): base·(step+1)/warmup during warm-up, then
    min + (base − min)·(1 + cos(π·progress))/2 with progress from 0 to 1 over the remaining steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each parameter group's lr from `warmup_cosine` of that group's own starting lr, each time `step()`
    is called (once per training step). `min_lr` is one floor shared by all groups (as in torch)."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} >= 1")
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.step_index = 0
        self._apply()

    def current(self) -> list:
        """The learning rate of every group at the current step."""
        return [warmup_cosine(self.step_index, base_lr, self.warmup_steps, self.total_steps, min(self.min_lr, base_lr))
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
        base_lrs = [float(lr) for lr in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"schedule state has {len(base_lrs)} group learning rate(s), the optimizer "
                             f"{len(self.optimizer.param_groups)} group(s)")
        self.step_index, self.base_lrs = int(state["step_index"]), base_lrs
        self._apply()
