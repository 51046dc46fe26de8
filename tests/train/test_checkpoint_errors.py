"""Damaged checkpoint files: clear CheckpointErrors for missing, truncated, corrupt, foreign and mismatched files."""
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
