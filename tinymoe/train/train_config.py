"""The settings of a training run (`TrainConfig`, validated) and which of them may change when a run resumes."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..engine.backend import normalize_device
from ..engine.checks import require_int, require_number

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
        op = "TrainConfig"
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "grad_accum"):
            setattr(self, name, require_int(getattr(self, name), name, op, low=1))
        self.seed = require_int(self.seed, "seed", op, low=0)
        self.warmup_steps = require_int(self.warmup_steps, "warmup_steps", op, low=0)
        if self.checkpoint_every is not None:
            self.checkpoint_every = require_int(self.checkpoint_every, "checkpoint_every", op, low=0)
        for name in ("lr", "grad_clip"):  # strictly positive: the checks' bounds are inclusive
            setattr(self, name, require_number(getattr(self, name), name, op, low=0.0))
            if getattr(self, name) == 0:
                raise ValueError(f"{op}: {name}={getattr(self, name)!r} must be > 0")
        self.min_lr = require_number(self.min_lr, "min_lr", op, low=0.0, high=self.lr)  # the cosine's floor
        self.weight_decay = require_number(self.weight_decay, "weight_decay", op, low=0.0)
        self.checkpoint_seconds = require_number(self.checkpoint_seconds, "checkpoint_seconds", op, low=0.0)
        self.device = normalize_device(self.device)


def train_config_differences(saved: dict, config: TrainConfig) -> list:
    """[(field, checkpoint value, given value)] for the fields outside MAY_CHANGE_ON_RESUME that differ
    (a field the checkpoint lacks, from an earlier release, is not compared)."""
    given = asdict(config)
    return [(name, saved[name], value) for name, value in given.items()
            if name not in MAY_CHANGE_ON_RESUME and name in saved and saved[name] != value]
