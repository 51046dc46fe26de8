""".safetensors with NumPy alone: round trips of every dtype, zero-copy read-only views, bfloat16 both ways
(torch's bfloat16 conversion is the oracle for rounding), the byte layout checked by hand, and files exchanged
with the `safetensors` package in both directions."""
import json
import os

import numpy as np
import pytest

from tinymoe.io import SafetensorsFile, load_safetensors, save_safetensors
from tinymoe.io.safetensors_format import bfloat16_to_float32, float32_to_bfloat16


def every_dtype(seed=0):
    generator = np.random.default_rng(seed)
    return {
        "f64": generator.standard_normal((3, 4)), "f32": generator.standard_normal((2, 3, 2)).astype(np.float32),
        "f16": generator.standard_normal(5).astype(np.float16),
        "i64": generator.integers(-2**62, 2**62, size=4), "i32": generator.integers(-2**31, 2**31, 3, dtype=np.int32),
        "i16": np.array([-32768, 0, 32767], dtype=np.int16), "i8": np.array([-128, 5, 127], dtype=np.int8),
        "u8": np.arange(256, dtype=np.uint8), "u16": np.array([0, 65535], dtype=np.uint16),
        "u32": np.array([2**32 - 1], dtype=np.uint32), "u64": np.array([2**64 - 1], dtype=np.uint64),
        "bool": np.array([[True, False], [False, True]]), "scalar": np.float32(2.5), "empty": np.zeros((0, 3)),
        "big-endian": np.arange(4, dtype=">f4"), "strided": np.arange(12.0).reshape(3, 4)[:, ::2],
    }


def test_every_dtype_round_trips_exactly(tmp_path):
    tensors = every_dtype()
    save_safetensors(tensors, tmp_path / "all.safetensors", metadata={"format": "np", "note": "ünïcode"})
    loaded = SafetensorsFile(tmp_path / "all.safetensors")
    assert list(loaded) == list(tensors)
    assert loaded.metadata == {"format": "np", "note": "ünïcode"}
    for name, value in tensors.items():
        value = np.asarray(value)
        assert loaded[name].dtype == value.dtype.newbyteorder("="), name
        assert loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value)


def test_the_byte_layout_is_the_documented_one(tmp_path):
    path = tmp_path / "two.safetensors"
    save_safetensors({"a": np.array([1.0, -2.0], dtype=np.float32), "b": np.array([[7]], dtype=np.int16)}, path)
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + header_size]
    assert header_size % 8 == 0 and len(text) - len(text.rstrip(b" ")) < 8  # padded with < 8 spaces
    header = json.loads(text)
    assert header == {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "I16", "shape": [1, 1], "data_offsets": [8, 10]}}
    data = raw[8 + header_size:]
    assert data == np.array([1.0, -2.0], dtype="<f4").tobytes() + (7).to_bytes(2, "little")


def test_tensors_are_read_only_views_of_the_mapped_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": np.arange(1000, dtype=np.float32)}, path)
    loaded = load_safetensors(path)
    view = loaded["w"]
    assert not view.flags.writeable
    assert not view.flags.owndata and isinstance(view.base, np.ndarray)  # no copy of the data
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1.0
    assert type(view) is np.ndarray  # not np.memmap: arithmetic results are plain arrays


@pytest.mark.parametrize("values", [
    [0.0, -0.0, 1.0, -1.0, 1 + 2**-8, 1 + 2**-7, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.0e38, 3.4e38, -3.4e38,
     1e-40, -1e-45, np.inf, -np.inf, 65504.0, 1.00390625],
], ids=["ties-and-edges"])
def test_float32_to_bfloat16_rounds_like_torch(values):
    torch = pytest.importorskip("torch")
    generator = np.random.default_rng(1)
    magnitudes = 10.0 ** generator.integers(-30, 30, 20000)
    samples = np.concatenate([np.array(values, dtype=np.float32),
                              (generator.standard_normal(20000) * magnitudes).astype(np.float32),
                              generator.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    samples = samples[~np.isnan(samples)]
    assert samples.dtype == np.float32
    expected = torch.from_numpy(samples).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16(samples), expected)


def test_bfloat16_keeps_nan_and_widens_exactly():
    bits = float32_to_bfloat16(np.array([np.nan, -np.nan, 1.5], dtype=np.float32))
    widened = bfloat16_to_float32(bits)
    assert np.isnan(widened[:2]).all() and widened[2] == 1.5
    every_pattern = np.arange(2**16, dtype=np.uint16)
    wide = bfloat16_to_float32(every_pattern)
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(wide.view(np.uint32) >> 16, every_pattern)  # the top half, exactly
    finite = ~np.isnan(wide)
    np.testing.assert_array_equal(float32_to_bfloat16(wide[finite]), every_pattern[finite])  # exact values stay


def test_bf16_option_stores_floats_as_bfloat16_and_leaves_integers(tmp_path):
    path = tmp_path / "bf16.safetensors"
    values = np.array([[1.0, 1 + 2**-8, 1 + 3 * 2**-8]], dtype=np.float32)
    save_safetensors({"w": values, "ids": np.arange(3)}, path, bf16=True)
    loaded = SafetensorsFile(path)
    assert loaded.dtypes == {"w": "BF16", "ids": "I64"}
    assert os.path.getsize(path) == 8 + int.from_bytes(path.read_bytes()[:8], "little") + 6 + 24
    np.testing.assert_array_equal(loaded["w"], [[1.0, 1.0, 1 + 2**-6]])  # ties to even: down, then up
    assert loaded["w"].dtype == np.float32 and loaded["w"].flags.writeable  # a fresh, widened array


# ----- exchange with the safetensors package (both directions) ----------------------------------------------------
def test_files_written_here_load_in_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {name: value for name, value in every_dtype(2).items() if name != "scalar"}
    path = tmp_path / "ours.safetensors"
    save_safetensors(tensors, path, metadata={"k": "v"})
    theirs = safetensors_numpy.load_file(str(path))
    assert set(theirs) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(theirs[name], value)
        assert theirs[name].dtype == np.asarray(value).dtype.newbyteorder("=")
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as handle:
        assert handle.metadata() == {"k": "v"}


def test_files_written_by_the_safetensors_package_load_here(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {name: np.ascontiguousarray(value, dtype=np.asarray(value).dtype.newbyteorder("="))
               for name, value in every_dtype(3).items() if name not in ("scalar",)}
    path = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"source": "safetensors"})
    loaded = SafetensorsFile(path)
    assert set(loaded) == set(tensors) and loaded.metadata == {"source": "safetensors"}
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)


def test_bfloat16_both_ways_with_the_package_and_torch(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(64, 33, generator=generator) * 3
    # theirs -> ours
    safetensors_torch.save_file({"w": source.to(torch.bfloat16), "s": source[0]}, str(tmp_path / "theirs.safetensors"))
    loaded = load_safetensors(tmp_path / "theirs.safetensors")
    np.testing.assert_array_equal(loaded["w"], source.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(loaded["s"], source[0].numpy())
    # ours -> theirs: the same bits torch's own rounding gives
    save_safetensors({"w": source.numpy()}, tmp_path / "ours.safetensors", bf16=True)
    theirs = safetensors_torch.load_file(str(tmp_path / "ours.safetensors"))
    assert theirs["w"].dtype == torch.bfloat16
    assert torch.equal(theirs["w"].view(torch.int16), source.to(torch.bfloat16).view(torch.int16))


def test_a_save_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    from tinymoe.io import safetensors_writer
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": np.ones(3)}, path)
    before = path.read_bytes()
    written = []

    def fail_on_the_second_tensor(array):
        written.append(array)
        if len(written) == 2:
            raise KeyboardInterrupt
        return memoryview(array)

    monkeypatch.setattr(safetensors_writer, "memoryview", fail_on_the_second_tensor, raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"a": np.zeros(3), "b": np.zeros(5)}, path)
    monkeypatch.undo()
    assert len(written) == 2 and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
