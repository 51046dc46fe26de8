"""Optimizers (SGD, Adam, AdamW), gradient clipping and learning-rate schedules."""
from .adam import Adam, AdamW
from .clip import clip_grad_norm
from .optimizer import Optimizer
from .schedule import WarmupCosine, warmup_cosine
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "WarmupCosine", "clip_grad_norm", "warmup_cosine"]
