"""Checkpoint files: round trip of weights, optimizer state, step and RNG states; atomic replacement."""
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

from checkpoint_helpers import (TEXT, good_checkpoint, make_model_and_optimizer, model_config,  # noqa: F401
                                numpy_kernels, save_state, train_steps)

# ----- round trip --------------------------------------------------------------------------------------------
def test_round_trip_of_weights_optimizer_step_and_rng(tmp_path):
    config = model_config()
    model, optimizer = make_model_and_optimizer(config)
    train_steps(model, optimizer, 0, 3)
    path = tmp_path / "checkpoint.npz"
    save_state(path, model, optimizer, step=3)

    checkpoint = load_checkpoint(path)
    assert checkpoint.meta["step"] == 3
    assert checkpoint.meta["model_config"] == config.to_dict()
    state = model.state_dict()
    assert set(checkpoint.model_state) == set(state)
    for name, value in state.items():
        assert checkpoint.model_state[name].dtype == value.dtype
        np.testing.assert_array_equal(checkpoint.model_state[name], value)
    saved_optimizer = optimizer.state_dict()
    assert checkpoint.optimizer_state["step_count"] == 3
    assert len(checkpoint.optimizer_state["groups"]) == len(saved_optimizer["groups"])
    for position, entry in saved_optimizer["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(checkpoint.optimizer_state["state"][int(position)][name], value)


def test_restored_run_continues_exactly_like_the_uninterrupted_one(tmp_path):
    """Weights + optimizer + RNG (dropout, jitter) from the file reproduce the next steps bit for bit."""
    config = model_config()
    model, optimizer = make_model_and_optimizer(config)
    train_steps(model, optimizer, 0, 3)
    save_state(tmp_path / "c.npz", model, optimizer, step=3)
    expected_losses = train_steps(model, optimizer, 3, 3)
    expected_state = model.state_dict()

    checkpoint = load_checkpoint(tmp_path / "c.npz")
    check_same_config(checkpoint, config.to_dict())
    fresh, fresh_optimizer = make_model_and_optimizer(TransformerConfig.from_dict(checkpoint.meta["model_config"]),
                                                      seed=123)  # other init and other RNG: all must be restored
    fresh.load_state_dict(checkpoint.model_state)
    fresh_optimizer.load_state_dict(checkpoint.optimizer_state)
    restore_generator_states(fresh, checkpoint.meta["generators"])
    assert train_steps(fresh, fresh_optimizer, 3, 3) == expected_losses
    for name, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, expected_state[name])


def test_generator_states_round_trip_through_json():
    model = MoETransformer(model_config(), seed=0)
    states = json.loads(json.dumps(generator_states(model)))
    assert states, "a model with dropout and jitter holds random generators"
    first = [generator.random() for generator in _generators(model)]
    other = MoETransformer(model_config(), seed=99)
    restore_generator_states(other, states)
    assert [generator.random() for generator in _generators(other)] == first


def _generators(model):
    found = {}
    for _, module in model.named_modules():
        for value in vars(module).values():
            if isinstance(value, np.random.Generator):
                found[id(value)] = value
    return list(found.values())


def test_load_trained_model_from_a_directory_or_a_file(tmp_path):
    config = model_config(vocab_size=5)
    model = MoETransformer(config, seed=4)
    save_checkpoint(tmp_path / "checkpoint.npz", model.state_dict(), None,
                    {"model_config": config.to_dict(), "vocab": "abcde"})
    tokens = np.array([[0, 1, 2, 3]])
    expected = model.eval()(tokens).numpy()
    for where in (tmp_path, tmp_path / "checkpoint.npz", str(tmp_path)):
        loaded, vocab = load_trained_model(where)
        assert vocab == "abcde"
        assert not loaded.training
        np.testing.assert_array_equal(loaded(tokens).numpy(), expected)


# ----- errors ------------------------------------------------------------------------------------------------
# ----- atomic writes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_failed_save_leaves_the_old_checkpoint_and_no_temporary_file(good_checkpoint, monkeypatch, failure):
    before = good_checkpoint.read_bytes()
    old_step = load_checkpoint(good_checkpoint).meta["step"]
    real_savez = np.savez

    def savez_then_fail(file, **arrays):
        real_savez(file, **dict(list(arrays.items())[:2]))  # part of the archive reaches the disk
        raise failure

    monkeypatch.setattr(np, "savez", savez_then_fail)
    model, optimizer = make_model_and_optimizer(model_config(d_model=16))
    with pytest.raises(type(failure)):
        save_state(good_checkpoint, model, optimizer, step=99)
    monkeypatch.undo()
    assert good_checkpoint.read_bytes() == before
    assert load_checkpoint(good_checkpoint).meta["step"] == old_step
    assert sorted(os.listdir(good_checkpoint.parent)) == ["checkpoint.npz"]


def test_save_replaces_an_existing_checkpoint(good_checkpoint):
    model, optimizer = make_model_and_optimizer(model_config())
    save_state(good_checkpoint, model, optimizer, step=42)
    assert load_checkpoint(good_checkpoint).meta["step"] == 42
    assert sorted(os.listdir(good_checkpoint.parent)) == ["checkpoint.npz"]


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask, expected):
    old_umask = os.umask(umask)
    try:
        model, optimizer = make_model_and_optimizer(model_config())
        save_state(tmp_path / "checkpoint.npz", model, optimizer, step=1)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "checkpoint.npz").st_mode) == expected
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary file left


# ----- the Trainer's checkpoint ------------------------------------------------------------------------------
def test_trainer_checkpoint_holds_everything_needed_to_resume(tmp_path):
    data = CharData.from_text(TEXT, seq_len=8)
    config = model_config(vocab_size=len(data.vocab))
    trainer = Trainer(config, TrainConfig(steps=2, batch_size=2, seq_len=8, eval_every=2, eval_batches=1,
                                          warmup_steps=1), data, str(tmp_path), stream=io.StringIO())
    trainer.run()
    checkpoint = load_checkpoint(tmp_path / "checkpoint.npz")
    meta = checkpoint.meta
    assert meta["step"] == 2
    assert meta["model_config"] == config.to_dict()
    assert meta["train_config"]["steps"] == 2 and meta["train_config"]["seed"] == 0
    assert meta["vocab"] == data.vocab
    assert meta["schedule"]["step_index"] == 2
    assert meta["generators"] and meta["batch_generator"]
    assert checkpoint.optimizer_state["step_count"] == 2
    assert len(checkpoint.optimizer_state["state"]) == len(trainer.model.parameters())
    for name, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(checkpoint.model_state[name], value)


# ----- damaged metadata: CheckpointError naming the file and the entry, never KeyError/TypeError ------------------
