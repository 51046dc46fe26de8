"""Checkpoints: one `.npz` file with the weights, the optimizer state, the configs, the step and every RNG state.

Layout: arrays "model/<name>" and "optimizer/<position>/<name>", plus "meta", a UTF-8 JSON document (format
version, model and training configs, step, optimizer hyperparameters, scheduler state, the bit-generator
states of every random generator, the vocabulary). Written atomically (temporary file, then rename); a
truncated or corrupt file fails its zip checksums and raises CheckpointError, as does one made for
another model configuration.
"""
from __future__ import annotations

import json
import math
import os
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from ..io.atomic import atomic_write, is_temporary_of

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, damaged metadata, or for another
    configuration. The message names the file and what is wrong."""


@dataclass
class Checkpoint:
    meta: dict
    model_state: dict
    optimizer_state: dict | None


# What `Trainer.resume` reads from the metadata (load_checkpoint(path, required=RESUME_KEYS) checks them all).
RESUME_KEYS = ("model_config", "train_config", "step", "seconds", "vocab", "schedule", "generators",
               "batch_generator", "optimizer")


def save_checkpoint(path, model_state: dict, optimizer_state: dict | None, meta: dict) -> None:
    arrays = {f"model/{name}": np.asarray(value) for name, value in model_state.items()}
    meta = dict(meta, format_version=FORMAT_VERSION)
    if optimizer_state is not None:
        for position, entry in optimizer_state["state"].items():
            for name, value in entry.items():
                arrays[f"optimizer/{position}/{name}"] = np.asarray(value)
        meta["optimizer"] = {"step_count": optimizer_state["step_count"], "groups": optimizer_state["groups"]}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def load_checkpoint(path, required=()) -> Checkpoint:
    """The checkpoint in `path`; CheckpointError naming the file for a missing file, a directory, a truncated
    or corrupt archive, another format version, or metadata that is damaged (not an object, a known entry of
    the wrong type, a bit-generator state NumPy refuses) or lacks one of the `required` keys."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a training run keeps its "
                              "checkpoint in DIR/checkpoint.npz)")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is not a tinymoe checkpoint (not an .npz archive; truncated or another "
                                  "kind of file)")
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:  # closed even if corrupt
            names = list(archive.files)
            if "meta" not in names:
                raise CheckpointError(f"{path} is not a tinymoe checkpoint (no 'meta' entry)")
            meta = json.loads(bytes(archive["meta"]).decode("utf-8"))
            if not isinstance(meta, dict):
                raise CheckpointError(f"{path} has damaged metadata: a JSON {type(meta).__name__}, not an object")
            model_state, optimizer_entries = {}, {}
            for name in names:
                if name.startswith("model/"):
                    model_state[name[len("model/"):]] = archive[name]
                elif name.startswith("optimizer/"):
                    _, position, key = name.split("/", 2)
                    optimizer_entries.setdefault(int(position), {})[key] = archive[name]
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError,
            NotImplementedError, RuntimeError) as error:  # zipfile reports unknown methods/flags this way
        raise CheckpointError(f"{path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')!r}; this tinymoe "
                              f"reads format {FORMAT_VERSION}")
    check_meta(meta, path, required)
    optimizer_state = None
    if "optimizer" in meta:
        optimizer_state = dict(meta["optimizer"], state=optimizer_entries)
    return Checkpoint(meta=meta, model_state=model_state, optimizer_state=optimizer_state)


def check_same_config(checkpoint: Checkpoint, model_config: dict, path="checkpoint") -> None:
    """CheckpointError listing every model-config field where the checkpoint differs from `model_config`
    (nested configs such as `moe` compared field by field: "moe.n_experts")."""
    saved, wanted = _flatten(checkpoint.meta.get("model_config", {})), _flatten(model_config)
    differences = [f"{key}: checkpoint {saved.get(key)!r} vs requested {wanted.get(key)!r}"
                   for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]
    if differences:
        raise CheckpointError(f"{path} was made for another model configuration: " + "; ".join(differences))


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def generator_states(model) -> dict:
    """The bit-generator state of every numpy Generator held by a module of `model`, by module path."""
    states = {}
    for module_name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if isinstance(value, np.random.Generator):
                states[f"{module_name}:{attribute}"] = value.bit_generator.state
    return states


def restore_generator_states(model, states: dict, path="checkpoint") -> None:
    """Set every generator of `model` found in `states` (from generator_states); CheckpointError naming `path`
    and the generator for a state NumPy refuses. Every state is checked before any generator changes."""
    found = []
    for module_name, module in model.named_modules():
        for attribute, value in vars(module).items():
            key = f"{module_name}:{attribute}"
            if isinstance(value, np.random.Generator) and key in states:
                check_bit_generator_state(states[key], f"generators[{key!r}]", path, value.bit_generator)
                found.append((value, states[key]))
    for generator, state in found:
        generator.bit_generator.state = state


def restore_training_state(checkpoint: Checkpoint, path, model, optimizer=None, schedule=None,
                           batch_generator=None) -> None:
    """Put a checkpoint back into a training run: weights, optimizer, schedule, the model's generators and the
    batch generator (those given). Anything that does not fit raises CheckpointError naming `path`."""
    meta = checkpoint.meta
    needed = ["generators"] + (["optimizer"] if optimizer is not None else []) + \
        (["schedule"] if schedule is not None else []) + (["batch_generator"] if batch_generator is not None else [])
    check_meta(meta, path, needed)
    if batch_generator is not None:
        check_bit_generator_state(meta["batch_generator"], "batch_generator", path, batch_generator.bit_generator)
    try:
        model.load_state_dict(checkpoint.model_state)
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        if schedule is not None:
            schedule.load_state_dict(meta["schedule"])
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} does not fit this training run: {error}") from None
    restore_generator_states(model, meta["generators"], path)
    if batch_generator is not None:
        batch_generator.bit_generator.state = meta["batch_generator"]


def remove_stale_temporaries(out_dir, older_than_s: float = 3600.0, name: str = "checkpoint.npz") -> list:
    """Delete the temporary files that atomic_write leaves beside `name` when a process is killed mid-save
    (`.tmp-<16 hex digits>-checkpoint.npz`), if last modified more than `older_than_s` seconds ago (a younger
    one may belong to a save in progress). Returns the paths removed; other files are never touched."""
    if isinstance(older_than_s, bool) or not isinstance(older_than_s, (int, float)) or not older_than_s >= 0:
        raise ValueError(f"remove_stale_temporaries: older_than_s={older_than_s!r} must be a number >= 0")
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        return []
    removed, now = [], time.time()
    for entry in os.scandir(out_dir):
        if not (is_temporary_of(entry.name, name) and entry.is_file(follow_symlinks=False)):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                os.unlink(entry.path)
                removed.append(entry.path)
        except FileNotFoundError:  # removed meanwhile (another run cleaning up, or the save finishing)
            continue
    return sorted(removed)


def load_trained_model(path, device: str = "cpu"):
    """(model in eval mode, vocab) from a checkpoint file or a training output directory."""
    from ..models import MoETransformer, TransformerConfig

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    checkpoint = load_checkpoint(path, required=("model_config", "vocab"))
    try:
        config = TransformerConfig.from_dict(checkpoint.meta["model_config"])
        model = MoETransformer(config, device=device)
        model.load_state_dict(checkpoint.model_state)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} does not hold a usable model: {error}") from None
    return model.eval(), checkpoint.meta["vocab"]


# ----- metadata checks ------------------------------------------------------------------------------------------
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _is_int(value, low=0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value, low=0.0) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= low)


def _counter_and_list_problem(value, counter: str, items: str, item_ok, item_text: str):
    """Why `value` is not an object {counter: int >= 0, items: non-empty list of item_ok items} (None if it is)."""
    if not isinstance(value, dict):
        return f"must be an object {{{counter}, {items}}}"
    if not _is_int(value.get(counter)):
        return f"{counter}={value.get(counter)!r} must be an int >= 0"
    listed = value.get(items)
    if not (isinstance(listed, list) and listed and all(item_ok(item) for item in listed)):
        return f"{items}={listed!r:.80} must be a non-empty list of {item_text}"
    return None


def _schedule_problem(value):
    return _counter_and_list_problem(value, "step_index", "base_lrs", _is_number, "finite numbers >= 0")


def _optimizer_problem(value):
    return _counter_and_list_problem(value, "step_count", "groups", lambda group: isinstance(group, dict), "objects")


def _generators_problem(value):
    if not isinstance(value, dict):
        return "must be an object {module path: bit-generator state}"
    for key, state in value.items():
        problem = _bit_generator_problem(state)
        if problem:
            return f"[{key!r}] {problem}"
    return None


def _bit_generator_problem(state, generator=None):
    """Why NumPy would refuse `state` (None if it takes it): tried on a fresh generator of the named kind, so
    `generator` itself is never changed here."""
    if not isinstance(state, dict) or state.get("bit_generator") not in _BIT_GENERATORS:
        return f"is not a NumPy bit-generator state (expected 'bit_generator' in {list(_BIT_GENERATORS)})"
    if generator is not None and type(generator).__name__ != state["bit_generator"]:
        return f"is a {state['bit_generator']} state, but this generator is a {type(generator).__name__}"
    try:
        getattr(np.random, state["bit_generator"])().state = state
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        return f"is damaged ({type(error).__name__}: {error})"
    return None


_META_CHECKS = {
    "model_config": lambda v: None if isinstance(v, dict) else "must be an object",
    "train_config": lambda v: None if isinstance(v, dict) else "must be an object",
    "step": lambda v: None if _is_int(v) else f"{v!r} must be an int >= 0",
    "seconds": lambda v: None if _is_number(v) else f"{v!r} must be a finite number >= 0",
    "vocab": lambda v: None if isinstance(v, str) and v else f"{v!r:.60} must be a non-empty string",
    "schedule": _schedule_problem,
    "optimizer": _optimizer_problem,
    "generators": _generators_problem,
    "batch_generator": _bit_generator_problem,
}


def check_meta(meta: dict, path, required=()) -> None:
    """CheckpointError naming `path` and the entry when a known metadata entry has the wrong type or range,
    or a `required` one is missing."""
    missing = [key for key in required if key not in meta]
    if missing:
        raise CheckpointError(f"{path} has damaged metadata: missing {missing} (present: {sorted(meta)})")
    for key, check in _META_CHECKS.items():
        problem = check(meta[key]) if key in meta else None
        if problem:
            raise CheckpointError(f"{path} has damaged metadata: {key} {problem}")


def check_bit_generator_state(state, what: str, path, generator=None) -> None:
    problem = _bit_generator_problem(state, generator)
    if problem:
        raise CheckpointError(f"{path} has damaged metadata: {what} {problem}")
