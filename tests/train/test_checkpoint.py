"""Checkpoint files: round trip of weights, optimizer state, step and RNG states; clear CheckpointErrors for
missing, truncated, corrupt, foreign and mismatched files; atomic replacement."""
import io
import json
import os
import stat
import struct
import zipfile

import numpy as np
import pytest

import tinymoe
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.optim import AdamW
from tinymoe.train.checkpoint import (CheckpointError, check_same_config, generator_states, load_checkpoint,
                                     load_trained_model, restore_generator_states, save_checkpoint)
from tinymoe.train.data import CharData
from tinymoe.train.loop import TrainConfig, Trainer

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


def model_config(**overrides):
    values = dict(vocab_size=9, d_model=8, n_layers=1, n_heads=2, max_seq_len=8, d_ff=8, n_experts=3, top_k=2,
                  dropout=0.2, jitter=0.1)
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
@pytest.fixture
def good_checkpoint(tmp_path):
    config = model_config()
    model, optimizer = make_model_and_optimizer(config)
    train_steps(model, optimizer, 0, 1)
    path = tmp_path / "checkpoint.npz"
    save_state(path, model, optimizer, step=1)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing-here.npz"):
        load_checkpoint(tmp_path / "nothing-here.npz")
    with pytest.raises(CheckpointError):
        load_trained_model(tmp_path / "empty-dir-that-does-not-exist")
    with pytest.raises(CheckpointError):
        load_trained_model(tmp_path)  # a directory without checkpoint.npz


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(good_checkpoint, keep):
    raw = good_checkpoint.read_bytes()
    good_checkpoint.write_bytes(raw[:int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match="checkpoint.npz"):
        load_checkpoint(good_checkpoint)


def test_truncated_by_one_byte(good_checkpoint):
    good_checkpoint.write_bytes(good_checkpoint.read_bytes()[:-1])
    with pytest.raises(CheckpointError):
        load_checkpoint(good_checkpoint)


def _member_data_offset(raw, member):
    """Byte offset where `member`'s stored data starts in the zip `raw`."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = archive.getinfo(member)
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_length + extra_length, info.compress_size


@pytest.mark.parametrize("member", ["model/token_embedding.weight.npy", "meta.npy"])
def test_corrupted_bytes_in_stored_data(good_checkpoint, member):
    raw = bytearray(good_checkpoint.read_bytes())
    start, size = _member_data_offset(bytes(raw), member)
    raw[start + size - 3] ^= 0x5A  # inside the array data, past the .npy header
    good_checkpoint.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(good_checkpoint)


def test_random_garbage(tmp_path):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are my notes, not a checkpoint\n")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_other_npz_or_zip_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(CheckpointError, match="not a tinymoe checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "archive.zip")


def test_npy_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.arange(10))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_wrong_format_version(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, meta=np.frombuffer(json.dumps({"format_version": 999}).encode(), dtype=np.uint8))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)


def test_meta_that_is_not_json(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, meta=np.frombuffer(b"\xff\xfe not json", dtype=np.uint8))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_any_single_corrupted_byte_gives_checkpoint_error_or_loads(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, None,
                    {"model_config": {"d_model": 4}, "step": 2})
    raw = path.read_bytes()
    unexpected = []
    for offset in range(len(raw)):
        corrupted = bytearray(raw)
        corrupted[offset] ^= 0xFF
        path.write_bytes(bytes(corrupted))
        try:
            load_checkpoint(path)
        except CheckpointError:
            pass
        except Exception as error:  # noqa: BLE001 - any other type is the failure being tested
            unexpected.append((offset, type(error).__name__))
    assert not unexpected, unexpected[:5]


def test_checkpoint_for_another_config(good_checkpoint):
    checkpoint = load_checkpoint(good_checkpoint)
    check_same_config(checkpoint, model_config().to_dict())  # same: no error
    with pytest.raises(CheckpointError, match="d_model") as error:
        check_same_config(checkpoint, model_config(d_model=16).to_dict())
    assert "n_experts" not in str(error.value)  # names what differs, only that
    with pytest.raises(CheckpointError, match="n_experts.*top_k|top_k.*n_experts"):
        check_same_config(checkpoint, model_config(n_experts=4, top_k=1).to_dict())


def test_weights_that_do_not_fit_the_saved_config(tmp_path):
    config = model_config()
    model = MoETransformer(config, seed=0)
    lying = dict(config.to_dict(), d_model=16)
    save_checkpoint(tmp_path / "checkpoint.npz", model.state_dict(), None, {"model_config": lying, "vocab": "x" * 9})
    with pytest.raises(CheckpointError):
        load_trained_model(tmp_path)
    state = model.state_dict()
    state.pop("final_norm.weight")
    save_checkpoint(tmp_path / "checkpoint.npz", state, None, {"model_config": config.to_dict(), "vocab": "x" * 9})
    with pytest.raises(CheckpointError, match="final_norm"):
        load_trained_model(tmp_path)


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
