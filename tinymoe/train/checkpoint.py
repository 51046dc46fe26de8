"""Checkpoints: one `.npz` file with the weights, the optimizer state, the configs, the step and every RNG state.

Layout: arrays "model/<name>" and "optimizer/<position>/<name>", plus "meta", a UTF-8 JSON document (format
version, model and training configs, step, optimizer hyperparameters, scheduler state, the bit-generator
states of every random generator, the vocabulary). Written atomically (temporary file, then rename); a
truncated or corrupt file fails its zip checksums and raises CheckpointError, as does one made for
another model configuration.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from ..io.atomic import atomic_write

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, or for another configuration."""


@dataclass
class Checkpoint:
    meta: dict
    model_state: dict
    optimizer_state: dict | None


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


def load_checkpoint(path) -> Checkpoint:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is not a tinymoe checkpoint (not an .npz archive; truncated or another "
                                  "kind of file)")
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "meta" not in names:
                raise CheckpointError(f"{path} is not a tinymoe checkpoint (no 'meta' entry)")
            meta = json.loads(bytes(archive["meta"]).decode("utf-8"))
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
    optimizer_state = None
    if "optimizer" in meta:
        optimizer_state = dict(meta["optimizer"], state=optimizer_entries)
    return Checkpoint(meta=meta, model_state=model_state, optimizer_state=optimizer_state)


def check_same_config(checkpoint: Checkpoint, model_config: dict, path="checkpoint") -> None:
    """CheckpointError listing every model-config field where the checkpoint differs from `model_config`."""
    saved = checkpoint.meta.get("model_config", {})
    differences = [f"{key}: checkpoint {saved.get(key)!r} vs requested {model_config.get(key)!r}"
                   for key in sorted(set(saved) | set(model_config)) if saved.get(key) != model_config.get(key)]
    if differences:
        raise CheckpointError(f"{path} was made for another model configuration: " + "; ".join(differences))


def generator_states(model) -> dict:
    """The bit-generator state of every numpy Generator held by a module of `model`, by module path."""
    states = {}
    for module_name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if isinstance(value, np.random.Generator):
                states[f"{module_name}:{attribute}"] = value.bit_generator.state
    return states


def restore_generator_states(model, states: dict) -> None:
    for module_name, module in model.named_modules():
        for attribute, value in vars(module).items():
            key = f"{module_name}:{attribute}"
            if isinstance(value, np.random.Generator) and key in states:
                value.bit_generator.state = states[key]


def load_trained_model(path, device: str = "cpu"):
    """(model in eval mode, vocab) from a checkpoint file or a training output directory."""
    from ..models import MoETransformer, TransformerConfig

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    checkpoint = load_checkpoint(path)
    try:
        config = TransformerConfig.from_dict(checkpoint.meta["model_config"])
        model = MoETransformer(config, device=device)
        model.load_state_dict(checkpoint.model_state)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} does not hold a usable model: {error}") from None
    return model.eval(), checkpoint.meta["vocab"]
