"""Shared pieces of the checkpoint tests: a tiny model, a few training steps, a saved state."""
import io
import json
import math
import os
import stat
import struct
import time
import zipfile

import numpy as np
import pytest

import tinymoe
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.optim import AdamW
from tinymoe.io import atomic
from tinymoe.train.checkpoint import (RESUME_KEYS, CheckpointError, check_same_config, generator_states,
                                     load_checkpoint, load_trained_model, remove_stale_temporaries,
                                     restore_generator_states, restore_training_state, save_checkpoint)
from tinymoe.train.data import CharData
from tinymoe.train.loop import TrainConfig, Trainer

__all__ = ["TEXT", "numpy_kernels", "model_config", "train_steps", "make_model_and_optimizer", "save_state",
           "good_checkpoint"]

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


def model_config(**overrides):
    moe = {"d_ff": 8, "n_experts": 3, "top_k": 2, "jitter": 0.1}
    moe.update({key: overrides.pop(key) for key in list(overrides) if key in moe})
    values = dict(vocab_size=9, d_model=8, n_layers=1, n_heads=2, max_seq_len=8, dropout=0.2, moe=moe)
    values.update(overrides)
    return TransformerConfig(**values)


def train_steps(model, optimizer, first_step, count):
    losses = []
    for step in range(first_step, first_step + count):
        tokens = np.random.default_rng(step).integers(0, 9, size=(2, 8))
        total, parts = model.loss(tokens, np.roll(tokens, -1, axis=1))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    return losses


def make_model_and_optimizer(config, seed=0):
    model = MoETransformer(config, seed=seed)
    return model, AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def save_state(path, model, optimizer, step):
    meta = {"model_config": model.config.to_dict(), "step": step, "generators": generator_states(model)}
    save_checkpoint(path, model.state_dict(), optimizer.state_dict(), meta)



@pytest.fixture
def good_checkpoint(tmp_path):
    config = model_config()
    model, optimizer = make_model_and_optimizer(config)
    train_steps(model, optimizer, 0, 1)
    path = tmp_path / "checkpoint.npz"
    save_state(path, model, optimizer, step=1)
    return path
