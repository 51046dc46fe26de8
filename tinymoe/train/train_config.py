"""The settings of a training run (`TrainConfig`, validated) and which of them may change when a run resumes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..engine.backend import normalize_device

# TrainConfig fields that may differ from the checkpoint's on resume: they change when and what is reported or
# where it runs, not the trajectory. Every other field must match (Trainer.resume lists the differences).
MAY_CHANGE_ON_RESUME = ("steps", "eval_every", "eval_batches", "checkpoint_every", "checkpoint_seconds", "device")


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int | None = None  # steps between checkpoints; 0: at evaluations only; None: by time
    checkpoint_seconds: float = 120.0    # with checkpoint_every=None: save once this long has passed
    grad_accum: int = 1                  # micro-batches of batch_size per optimizer step (accumulation.py)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name, value in (("seed", self.seed), ("checkpoint_every", self.checkpoint_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     for v in (self.lr, self.min_lr, self.weight_decay, self.grad_clip, self.checkpoint_seconds))
        if not (finite and self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr (got lr={self.lr}, min_lr={self.min_lr})")
        for name, value, ok in (("warmup_steps", self.warmup_steps, self.warmup_steps >= 0),
                                ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                                ("checkpoint_seconds", self.checkpoint_seconds, self.checkpoint_seconds >= 0),
                                ("grad_clip", self.grad_clip, self.grad_clip > 0)):
            if not ok:
                raise ValueError(f"{name}={value!r} must be {'> 0' if name == 'grad_clip' else '>= 0'}")
        self.device = normalize_device(self.device)


def train_config_differences(saved: dict, config: TrainConfig) -> list:
    """[(field, checkpoint value, given value)] for the fields outside MAY_CHANGE_ON_RESUME that differ
    (a field the checkpoint lacks, from an earlier release, is not compared)."""
    given = asdict(config)
    return [(name, saved[name], value) for name, value in given.items()
            if name not in MAY_CHANGE_ON_RESUME and name in saved and saved[name] != value]
