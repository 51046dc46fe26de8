"""Damaged checkpoint metadata and the clean-up of temporaries left by killed saves."""
import json
import math
import os
import time

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

def write_meta(path, meta):
    """A checkpoint archive whose meta entry is exactly `meta` (any JSON value), with one weight."""
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **{"model/w": np.ones(2)})
    return path


def trainer_meta():
    good_state = np.random.default_rng(0).bit_generator.state
    return {"format_version": 1, "model_config": model_config().to_dict(), "train_config": {"steps": 2}, "step": 2,
            "seconds": 1.5, "vocab": "abc", "schedule": {"step_index": 2, "base_lrs": [0.1, 0.1]},
            "generators": {"blocks.0:generator": good_state}, "batch_generator": good_state,
            "optimizer": {"step_count": 2, "groups": [{"lr": 0.1}]}}


def damaged(**changes):
    meta = trainer_meta()
    for key, value in changes.items():
        if value is KeyError:
            del meta[key]
        else:
            meta[key] = value
    return meta


def pcg_state(**changes):
    state = np.random.default_rng(0).bit_generator.state
    state.update(changes)
    return state


DAMAGED_META = {
    "a-list": ([1, 2, 3], "a JSON list, not an object"),
    "a-string": ("meta", "a JSON str"),
    "no-schedule": (damaged(schedule=KeyError), r"missing \['schedule'\]"),
    "no-vocab": (damaged(vocab=KeyError), r"missing \['vocab'\]"),
    "no-batch-generator": (damaged(batch_generator=KeyError), r"missing \['batch_generator'\]"),
    "schedule-a-list": (damaged(schedule=[2, [0.1]]), "schedule must be an object"),
    "schedule-step-str": (damaged(schedule={"step_index": "2", "base_lrs": [0.1]}), "schedule step_index='2'"),
    "schedule-lrs-nan": (damaged(schedule={"step_index": 2, "base_lrs": ["NaN"]}), "schedule base_lrs"),
    "step-negative": (damaged(step=-1), "step -1 must be an int"),
    "step-float": (damaged(step=2.5), "step 2.5 must be an int"),
    "step-bool": (damaged(step=True), "step True must be an int"),
    "seconds-str": (damaged(seconds="1.5"), "seconds '1.5'"),
    "vocab-list": (damaged(vocab=["a", "b"]), "vocab .* must be a non-empty string"),
    "model-config-list": (damaged(model_config=[8, 2]), "model_config must be an object"),
    "optimizer-groups-missing": (damaged(optimizer={"step_count": 1}), "optimizer groups=None"),
    "optimizer-step-str": (damaged(optimizer={"step_count": "1", "groups": [{}]}), "optimizer step_count='1'"),
    "batch-generator-not-a-state": (damaged(batch_generator=[1, 2]), "batch_generator is not a NumPy bit-generator"),
    "batch-generator-unknown-kind": (damaged(batch_generator=pcg_state(bit_generator="Evil")),
                                     "batch_generator is not a NumPy bit-generator"),
    "batch-generator-damaged": (damaged(batch_generator=pcg_state(state="garbage")), "batch_generator is damaged"),
    "batch-generator-no-state": (damaged(batch_generator={"bit_generator": "PCG64"}), "batch_generator is damaged"),
    "generators-damaged": (damaged(generators={"blocks.0:generator": pcg_state(state={"state": "x", "inc": 1})}),
                           r"generators \['blocks.0:generator'\] is damaged"),
    "generators-a-list": (damaged(generators=[]), "generators must be an object"),
}


@pytest.mark.parametrize("name", DAMAGED_META)
def test_damaged_metadata_is_a_checkpoint_error_naming_file_and_entry(tmp_path, name):
    meta, words = DAMAGED_META[name]
    path = write_meta(tmp_path / f"{name}.npz", meta)
    with pytest.raises(CheckpointError, match=rf"{name}\.npz has damaged metadata: .*{words}"):
        load_checkpoint(path, required=RESUME_KEYS)


def test_complete_trainer_metadata_passes_and_only_required_keys_are_demanded(tmp_path):
    assert load_checkpoint(write_meta(tmp_path / "good.npz", trainer_meta()), required=RESUME_KEYS).meta["step"] == 2
    sparse = write_meta(tmp_path / "sparse.npz", {"format_version": 1, "model_config": {"d_model": 4}})
    assert load_checkpoint(sparse).model_state["w"].shape == (2,)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(sparse, required=("vocab",))


def test_load_trained_model_without_a_vocabulary_is_a_checkpoint_error(tmp_path):
    config = model_config()
    save_checkpoint(tmp_path / "checkpoint.npz", MoETransformer(config, seed=0).state_dict(), None,
                    {"model_config": config.to_dict()})
    with pytest.raises(CheckpointError, match=r"checkpoint.npz has damaged metadata: missing \['vocab'\]"):
        load_trained_model(tmp_path)


def test_a_directory_passed_as_the_file(tmp_path):
    (tmp_path / "checkpoint.npz").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint.npz is a directory"):
        load_checkpoint(tmp_path / "checkpoint.npz")


@pytest.mark.parametrize("keep", [22, 100, 0.5, 0.99])
def test_a_truncated_npz_is_a_checkpoint_error_and_leaks_no_file_handle(tmp_path, keep, recwarn):
    path = write_meta(tmp_path / "cut.npz", trainer_meta())
    raw = path.read_bytes()
    path.write_bytes(raw[:keep if isinstance(keep, int) else int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match="cut.npz"):
        load_checkpoint(path)
    import gc
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


# ----- restoring a training run -----------------------------------------------------------------------------
def test_restore_training_state_turns_misfits_into_checkpoint_errors(good_checkpoint):
    checkpoint = load_checkpoint(good_checkpoint)
    model, optimizer = make_model_and_optimizer(model_config())
    restore_training_state(checkpoint, good_checkpoint, model, optimizer)  # fits: no error
    other, other_optimizer = make_model_and_optimizer(model_config(d_model=16, n_heads=2))
    with pytest.raises(CheckpointError, match="checkpoint.npz does not fit this training run"):
        restore_training_state(checkpoint, good_checkpoint, other, other_optimizer)
    with pytest.raises(CheckpointError, match=r"missing \['schedule'\]"):
        restore_training_state(checkpoint, good_checkpoint, model, optimizer, schedule=object())
    checkpoint.meta["batch_generator"] = np.random.Generator(np.random.MT19937(0)).bit_generator.state
    with pytest.raises(CheckpointError, match="batch_generator is a MT19937 state, but this generator is a PCG64"):
        restore_training_state(checkpoint, good_checkpoint, model, batch_generator=np.random.default_rng(0))


def test_restore_generator_states_checks_every_state_before_changing_any():
    model = MoETransformer(model_config(), seed=0)
    states = generator_states(model)
    first, *rest = sorted(states)
    before = json.dumps(generator_states(model))
    damaged_states = dict(states, **{key: {"bit_generator": "PCG64", "state": "x"} for key in rest[-1:]})
    with pytest.raises(CheckpointError, match="damaged"):
        restore_generator_states(model, damaged_states, "run/checkpoint.npz")
    assert json.dumps(generator_states(model)) == before


# ----- orphaned temporary files --------------------------------------------------------------------------------
def test_remove_stale_temporaries_removes_only_old_orphans_of_the_checkpoint(tmp_path):
    old, young = time.time() - 7200, time.time() - 10
    names = {".tmp-0123456789abcdef-checkpoint.npz": old,    # orphan of a killed save: removed
             ".tmp-fedcba9876543210-checkpoint.npz": young,  # maybe a save in progress: kept
             ".tmp-0123456789abcdef-metrics.jsonl": old,     # another file's temporary: kept
             ".tmp-xyz-checkpoint.npz": old,                 # not atomic_write's pattern: kept
             "checkpoint.npz": old, "notes.txt": old}
    for name, mtime in names.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / ".tmp-1111111111111111-checkpoint.npz").mkdir()  # a directory is never removed
    removed = remove_stale_temporaries(tmp_path, older_than_s=3600)
    assert removed == [str(tmp_path / ".tmp-0123456789abcdef-checkpoint.npz")]
    assert sorted(os.listdir(tmp_path)) == sorted(set(names) - {".tmp-0123456789abcdef-checkpoint.npz"}
                                                  | {".tmp-1111111111111111-checkpoint.npz"})
    young_one = str(tmp_path / ".tmp-fedcba9876543210-checkpoint.npz")
    assert remove_stale_temporaries(tmp_path, older_than_s=0) == [young_one]
    assert remove_stale_temporaries(tmp_path / "no-such-dir") == []


def test_remove_stale_temporaries_finds_what_a_killed_save_leaves(tmp_path, monkeypatch):
    def savez_then_die(file, **arrays):
        file.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "os", _NoUnlink(os))  # a kill: the cleanup in atomic_write never runs
    monkeypatch.setattr(np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint.npz", {"w": np.ones(2)}, None, {})
    monkeypatch.undo()
    (orphan,) = os.listdir(tmp_path)
    assert remove_stale_temporaries(tmp_path, older_than_s=0) == [str(tmp_path / orphan)]
    assert os.listdir(tmp_path) == []


class _NoUnlink:
    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def unlink(self, path):
        pass


@pytest.mark.parametrize("older_than_s", [-1, "60", True, math.nan])
def test_remove_stale_temporaries_checks_its_age(tmp_path, older_than_s):
    with pytest.raises(ValueError, match="older_than_s"):
        remove_stale_temporaries(tmp_path, older_than_s=older_than_s)
