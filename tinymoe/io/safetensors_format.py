"""The `.safetensors` format, read and written with NumPy alone (no `safetensors` package needed).

A file is
    8 bytes         N, the header length, an unsigned little-endian 64-bit integer
    N bytes         a UTF-8 JSON object {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
                    ..., "__metadata__": {str: str}} (the metadata entry is optional), padded with spaces
    the rest        the tensors' raw little-endian bytes, row-major; `data_offsets` count from the first byte
                    after the header, and the tensors cover that data section exactly, without holes or overlaps
                    (as the reference implementation requires)

bfloat16 ("BF16") has no NumPy dtype. A bfloat16 is the top 16 bits of a float32, so it widens exactly:
float32 bits = bf16 bits << 16. Narrowing float32 -> bfloat16 rounds to nearest, ties to even (as torch's
`.to(torch.bfloat16)` does): bits + 0x7FFF + (bit 16 of bits), then the top 16 bits; NaNs stay quiet NaNs.
"""
from __future__ import annotations

import json
import math

import numpy as np

METADATA_KEY = "__metadata__"
HEADER_ALIGNMENT = 8

# safetensors dtype code -> NumPy dtype of the bytes in the file ("BF16": the raw 16-bit patterns)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# NumPy dtype (native byte order) -> safetensors code, for writing
CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
         np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
         np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32", np.dtype(np.uint16): "U16",
         np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


class SafetensorsError(ValueError):
    """A `.safetensors` file (or index) that cannot be read, or tensors that cannot be written as one.
    The message names the file and the tensor or key at fault."""


def bfloat16_to_float32(bits) -> np.ndarray:
    """uint16 bfloat16 patterns -> float32, exactly. Allocates the float32 result only (4 bytes per value)."""
    widened = np.asarray(bits, dtype="<u2").astype(np.uint32)
    widened <<= 16
    return widened.view(np.float32)


def float32_to_bfloat16(values) -> np.ndarray:
    """float32 -> uint16 bfloat16 patterns, rounded to nearest with ties to even; NaN stays NaN (quiet).
    float16/float64 are first converted to float32 by NumPy (exact for float16; rounded for float64)."""
    bits = np.asarray(values, dtype=np.float32, order="C").view(np.uint32)  # keeps 0-d shapes
    is_nan = np.isnan(bits.view(np.float32))
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))  # no overflow: only NaNs exceed 0xFF80_0000
    result = (rounded >> 16).astype(np.uint16)
    if is_nan.any():
        result[is_nan] = ((bits[is_nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return result


def parse_header(path: str, raw_header: bytes, data_size: int) -> tuple[dict, dict]:
    """({name: (code, shape, begin, end)}, metadata) from the JSON header, every entry checked against the
    data section of `data_size` bytes. Raises SafetensorsError naming `path` and the entry at fault."""
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: the header is not UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header must be a JSON object, got a {type(header).__name__}")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: {METADATA_KEY!r} must be an object of strings, got {metadata!r:.80}")
    entries = {name: _parse_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_coverage(path, entries, data_size)
    return entries, metadata


def _parse_entry(path, name, entry, data_size):
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{where}: expected an object with keys dtype, shape, data_offsets; got {entry!r:.120}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise SafetensorsError(f"{where}: unknown or unsupported dtype {code!r}; tinymoe reads {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_count(size) for size in shape)):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(offset) for offset in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    if end > data_size:
        raise SafetensorsError(f"{where}: data_offsets {offsets} point past the end of the data "
                               f"({data_size} bytes; the file is truncated or the header is wrong)")
    expected = math.prod(shape) * DTYPES[code].itemsize
    if end - begin != expected:
        raise SafetensorsError(f"{where}: shape {shape} of {code} needs {expected} bytes but data_offsets "
                               f"{offsets} hold {end - begin}")
    return code, tuple(shape), begin, end


def _check_coverage(path, entries, data_size):
    position, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin < position:
            raise SafetensorsError(f"{path}: tensors {previous!r} and {name!r} overlap (bytes {begin}..{position})")
        if begin > position:
            raise SafetensorsError(f"{path}: bytes {position}..{begin} before tensor {name!r} belong to no tensor")
        position, previous = end, name
    if position != data_size:
        raise SafetensorsError(f"{path}: the data section has {data_size} bytes but the tensors cover {position} "
                               "(trailing bytes, or a damaged header)")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_header(entries: dict, metadata: dict | None) -> bytes:
    """The length prefix and the space-padded JSON header for {name: (code, shape, begin, end)}."""
    header = {}
    if metadata:
        header[METADATA_KEY] = metadata
    for name, (code, shape, begin, end) in entries.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return len(text).to_bytes(8, "little") + text
