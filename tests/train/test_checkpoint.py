"""Checkpoint files: round trip of weights, optimizer state, step and RNG states; clear CheckpointErrors for
missing, truncated, corrupt, foreign and mismatched files; atomic replacement."""
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


# ----- damaged metadata: CheckpointError naming the file and the entry, never KeyError/TypeError ------------------
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
