"""Reading and writing `.safetensors` files through the optional `safetensors` package.

bfloat16 tensors (what Mixtral checkpoints hold) have no NumPy dtype; they are widened to float32 exactly
(a bfloat16 is the top 16 bits of a float32).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..engine.backend import BackendUnavailableError
from .atomic import atomic_write


def _package():
    try:
        import safetensors.numpy as safetensors_numpy
        from safetensors import safe_open
    except ImportError as error:
        raise BackendUnavailableError(
            "reading .safetensors files needs the safetensors package: pip install 'tinymoe[safetensors]'"
        ) from error
    return safe_open, safetensors_numpy


def _bfloat16_as_float32(path, name) -> np.ndarray:
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(header_size))[name]
        begin, end = entry["data_offsets"]
        handle.seek(8 + header_size + begin)
        raw = np.frombuffer(handle.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def load_safetensors(path) -> dict:
    """All tensors of a .safetensors file as {name: numpy array}; bfloat16 becomes float32.

    Raises FileNotFoundError for a missing file and ValueError naming the file when it is not a valid one.
    """
    safe_open, _ = _package()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such .safetensors file: {path}")
    tensors = {}
    try:
        with safe_open(path, framework="numpy") as handle:
            for name in handle.keys():
                try:
                    tensors[name] = handle.get_tensor(name)
                except TypeError:  # bfloat16: NumPy has no such dtype
                    tensors[name] = _bfloat16_as_float32(path, name)
    except (OSError, ValueError, KeyError, struct.error, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid .safetensors file ({error})") from None
    except Exception as error:  # the package raises its own SafetensorError for corrupt headers
        if type(error).__name__ == "SafetensorError":
            raise ValueError(f"{path}: not a valid .safetensors file ({error})") from None
        raise
    return tensors


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {name: array} to `path` atomically (temporary file, then rename)."""
    _, safetensors_numpy = _package()
    arrays = {name: np.ascontiguousarray(np.asarray(array)) for name, array in tensors.items()}
    payload = safetensors_numpy.save(arrays, metadata=metadata)
    with atomic_write(path) as handle:
        handle.write(payload)
