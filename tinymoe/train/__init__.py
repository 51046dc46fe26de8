"""Training: character data and the generated corpus, the training loop, checkpoints, progress and plots."""
from .corpus import generate_corpus
from .data import CharData
from .loop import TrainConfig, Trainer

__all__ = ["CharData", "TrainConfig", "Trainer", "generate_corpus"]
