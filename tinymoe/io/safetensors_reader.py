"""Reading `.safetensors` files (one file, or a sharded checkpoint with its index) over `np.memmap`.

Tensors are read-only views of the mapped file: opening costs the header only, and a tensor's pages are read
from disk when first touched (they count as file-backed, reclaimable memory). bfloat16 tensors are widened to
new float32 arrays (4 bytes per value) when they are looked up. The format is described in safetensors_format.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from .safetensors_format import DTYPES, SafetensorsError, bfloat16_to_float32, parse_header

INDEX_NAME = "model.safetensors.index.json"


def _regular_file(path, what="file") -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise SafetensorsError(f"{path} is a directory, not a .safetensors {what}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such .safetensors {what}: {path}")
    if not os.path.isfile(path):
        raise SafetensorsError(f"{path} is not a regular file")
    return path


class SafetensorsFile(Mapping):
    """A `.safetensors` file as a read-only mapping {name: numpy array}; the header is read and checked when
    it is opened, each tensor is a view of the memory-mapped file (bfloat16: widened to float32 per lookup).

    `metadata` holds the header's "__metadata__" strings; `dtypes` the stored dtype code of every tensor.
    """

    def __init__(self, path):
        self.path = _regular_file(path)
        file_size = os.path.getsize(self.path)
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{self.path}: truncated ({file_size} bytes; a .safetensors file starts "
                                       "with an 8-byte header length)")
            header_size = int.from_bytes(prefix, "little")
            if header_size > file_size - 8:
                raise SafetensorsError(f"{self.path}: the header length {header_size} points past the end of the "
                                       f"file ({file_size} bytes; truncated, or not a .safetensors file)")
            raw_header = handle.read(header_size)
        data_start = 8 + header_size
        self._entries, self.metadata = parse_header(self.path, raw_header, file_size - data_start)
        self.dtypes = {name: entry[0] for name, entry in self._entries.items()}
        if file_size > data_start:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=data_start).view(np.ndarray)
        else:  # nothing to map (np.memmap refuses empty ranges): every tensor is empty
            self._data = np.zeros(0, dtype=np.uint8)
            self._data.flags.writeable = False

    def __getitem__(self, name) -> np.ndarray:
        try:
            code, shape, begin, end = self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} holds no tensor {name!r}") from None
        raw = self._data[begin:end].view(DTYPES[code]).reshape(shape)
        return bfloat16_to_float32(raw) if code == "BF16" else raw

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def load_safetensors(path) -> dict:
    """All tensors of a `.safetensors` file as {name: numpy array}.

    Arrays are read-only views of the memory-mapped file (copy one to change it); bfloat16 becomes float32.
    Raises FileNotFoundError for a missing file and SafetensorsError (a ValueError) naming the file and the
    tensor for a directory, a truncated file or a damaged header.
    """
    return dict(SafetensorsFile(path))


class SafetensorsIndex(Mapping):
    """A sharded checkpoint as a lazy read-only mapping {name: numpy array}: each shard is opened (and its
    header checked) the first time one of its tensors is looked up, and kept open after that."""

    def __init__(self, index_path, weight_map: dict, metadata: dict):
        self.path, self.weight_map, self.metadata = index_path, weight_map, metadata
        self.directory = os.path.dirname(index_path)
        self._shards = {}

    def shard(self, filename: str) -> SafetensorsFile:
        if filename not in self._shards:
            self._shards[filename] = SafetensorsFile(os.path.join(self.directory, filename))
        return self._shards[filename]

    def __getitem__(self, name) -> np.ndarray:
        try:
            filename = self.weight_map[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r} in the weight_map") from None
        shard = self.shard(filename)
        if name not in shard:
            raise SafetensorsError(f"{self.path}: the weight_map puts tensor {name!r} in {filename}, "
                                   "which does not hold it")
        return shard[name]

    def __iter__(self):
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def __repr__(self) -> str:
        return f"SafetensorsIndex({self.path!r}, {len(self)} tensors in {len(set(self.weight_map.values()))} shards)"


def load_safetensors_index(path) -> SafetensorsIndex:
    """A sharded checkpoint (transformers' layout): `path` is its directory or its
    `model.safetensors.index.json`, {"metadata": {...}, "weight_map": {tensor name: shard file name}}.

    Returns a lazy mapping (see SafetensorsIndex). Shard names must be plain file names in the index's
    directory; every shard must exist. Raises SafetensorsError naming the index and the entry at fault.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, INDEX_NAME)
    path = _regular_file(path, "index")
    try:
        with open(path, "rb") as handle:
            index = json.loads(handle.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: not a JSON index ({error})") from None
    if not isinstance(index, dict):
        raise SafetensorsError(f"{path}: the index must be a JSON object, got a {type(index).__name__}")
    weight_map, metadata = index.get("weight_map"), index.get("metadata", {})
    if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{path}: 'weight_map' must be an object {{tensor name: shard file}}, "
                               f"got {weight_map!r:.80}")
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: 'metadata' must be an object, got {metadata!r:.80}")
    directory = os.path.dirname(path)
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or os.path.basename(filename) != filename or filename in ("", ".", ".."):
            raise SafetensorsError(f"{path}: tensor {name!r} maps to {filename!r}; shards must be plain file names "
                                   "beside the index")
    for filename in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(directory, filename)):
            names = [name for name, shard in weight_map.items() if shard == filename]
            raise SafetensorsError(f"{path}: shard {filename} (holding {names[:3]}...) is missing")
    return SafetensorsIndex(path, weight_map, metadata)
