"""Writing `.safetensors` files (one file, or shards with transformers' index) with NumPy alone, atomically.

The header is padded with spaces to a multiple of 8 bytes, so the data section starts 8-byte aligned.
Tensors are written in the order given, back to back. Supported dtypes: float64/32/16, int64/32/16/8,
uint64/32/16/8, bool; `bf16=True` stores floating tensors as bfloat16 (rounded to nearest, ties to even).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from .atomic import atomic_write
from .safetensors_format import CODES, METADATA_KEY, SafetensorsError, encode_header, float32_to_bfloat16
from .safetensors_reader import INDEX_NAME


def _prepare(tensors, bf16, where) -> dict:
    """{name: (code, little-endian C-contiguous array)}, every name and dtype checked."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{where}: tensors must be a mapping {{name: array}}, got {type(tensors).__name__}")
    if not isinstance(bf16, bool):
        raise TypeError(f"{where}: bf16={bf16!r} must be True or False")
    prepared = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise SafetensorsError(f"{where}: tensor name {name!r} must be a non-empty string other than "
                                   f"{METADATA_KEY!r}")
        array = np.asarray(value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value)
        native = array.dtype.newbyteorder("=")
        if bf16 and array.dtype.kind == "f":
            prepared[name] = ("BF16", float32_to_bfloat16(array))
            continue
        if native not in CODES:
            raise SafetensorsError(f"{where}: tensor {name!r} has dtype {array.dtype}, which .safetensors cannot "
                                   f"hold; supported: {sorted(str(dtype) for dtype in CODES)} (and bf16=True)")
        prepared[name] = (CODES[native], np.asarray(array, dtype=native.newbyteorder("<"), order="C"))
    return prepared


def _check_metadata(metadata, where) -> dict | None:
    if metadata is None:
        return None
    if not (isinstance(metadata, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items())):
        raise SafetensorsError(f"{where}: metadata must be a mapping of str to str, got {metadata!r:.80}")
    return dict(metadata)


def _write(path, prepared: dict, metadata) -> int:
    entries, position = {}, 0
    for name, (code, array) in prepared.items():
        entries[name] = (code, array.shape, position, position + array.nbytes)
        position += array.nbytes
    with atomic_write(path) as handle:
        handle.write(encode_header(entries, metadata))
        for _, array in prepared.values():
            if array.size:
                handle.write(memoryview(array.reshape(-1)).cast("B"))
    return position


def save_safetensors(tensors: Mapping, path, metadata: dict | None = None, *, bf16: bool = False) -> None:
    """Write {name: array} to `path` as one `.safetensors` file, atomically (temporary file, then rename).

    `metadata`: {str: str} stored as "__metadata__". `bf16=True`: every floating tensor is stored as bfloat16
    (float32 -> bf16 rounds to nearest, ties to even; float64 is rounded to float32 first, so a value can
    land one bf16 step off the correctly rounded one in rare double-rounding ties).
    """
    where = f"save_safetensors({os.fspath(path)!r})"
    _write(path, _prepare(tensors, bf16, where), _check_metadata(metadata, where))


def save_safetensors_sharded(tensors: Mapping, directory, max_shard_bytes: int = 5 * 2**30,
                             metadata: dict | None = None, *, bf16: bool = False, prefix: str = "model") -> str:
    """Write tensors as shards `{prefix}-00001-of-0000N.safetensors` of at most `max_shard_bytes` of data
    each (a larger tensor gets a shard of its own), filled in the order given, plus the index
    `{prefix}.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name: shard}}),
    as transformers writes them. Each file is written atomically, the index last. Returns the index path.
    """
    where = f"save_safetensors_sharded({os.fspath(directory)!r})"
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"{where}: max_shard_bytes={max_shard_bytes!r} must be a positive int")
    if not (isinstance(prefix, str) and prefix and os.path.basename(prefix) == prefix):
        raise ValueError(f"{where}: prefix={prefix!r} must be a plain file name stem")
    prepared, metadata = _prepare(tensors, bf16, where), _check_metadata(metadata, where)
    shards, current, current_bytes = [], {}, 0
    for name, (code, array) in prepared.items():
        if current and current_bytes + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = (code, array)
        current_bytes += array.nbytes
    shards.append(current)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    weight_map, total_size = {}, 0
    for number, shard in enumerate(shards, start=1):
        filename = f"{prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
        total_size += _write(os.path.join(directory, filename), shard, metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    index_path = os.path.join(directory, INDEX_NAME if prefix == "model" else f"{prefix}.safetensors.index.json")
    with atomic_write(index_path, "w") as handle:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, handle, indent=2)
    return index_path
