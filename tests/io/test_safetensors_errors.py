"""Damaged .safetensors files and bad arguments: each raises one clear error (SafetensorsError, a ValueError)
that names the file and the tensor or key at fault; sharded checkpoints with their index."""
import json
import os

import numpy as np
import pytest

from tinymoe.io import (SafetensorsError, load_safetensors, load_safetensors_index, save_safetensors,
                        save_safetensors_sharded)


def header_file(path, header, data=b"", header_size=None):
    """A file with exactly this JSON header (no padding) and data section."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if header_size is None else header_size
    path.write_bytes(size.to_bytes(8, "little") + text + data)
    return path


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

DAMAGED = {  # name: (header, data, words the message must hold)
    "header-not-json": (b"{not json", b"", "not UTF-8 JSON"),
    "header-not-utf8": (b"\xff\xfe{}", b"", "not UTF-8 JSON"),
    "header-a-list": ([1, 2], b"", "JSON object"),
    "unknown-dtype": ({"w": dict(F32_2, dtype="F8_E4M3")}, b"\0" * 8, "'w'.*unknown or unsupported dtype 'F8_E4M3'"),
    "entry-not-object": ({"w": [0, 8]}, b"\0" * 8, "'w'.*expected an object"),
    "missing-shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, "'w'.*expected an object"),
    "shape-negative": ({"w": dict(F32_2, shape=[-2])}, b"\0" * 8, "'w'.*shape"),
    "shape-bool": ({"w": dict(F32_2, shape=[True, 2])}, b"\0" * 8, "'w'.*shape"),
    "shape-wrong-bytes": ({"w": dict(F32_2, shape=[3])}, b"\0" * 8, r"'w'.*needs 12 bytes.*hold 8"),
    "offsets-reversed": ({"w": dict(F32_2, data_offsets=[8, 0])}, b"\0" * 8, "'w'.*begin <= end"),
    "offsets-past-end": ({"w": dict(F32_2, data_offsets=[4, 12])}, b"\0" * 8, "'w'.*past the end"),
    "overlap": ({"a": F32_2, "b": dict(F32_2, data_offsets=[4, 12])}, b"\0" * 12, "'a' and 'b' overlap"),
    "hole": ({"a": dict(F32_2, data_offsets=[4, 12])}, b"\0" * 12, "before tensor 'a' belong to no tensor"),
    "trailing-bytes": ({"a": F32_2}, b"\0" * 12, "12 bytes but the tensors cover 8"),
    "metadata-not-strings": ({"__metadata__": {"n": 1}, "a": F32_2}, b"\0" * 8, "__metadata__"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_header_raises_a_safetensors_error_naming_file_and_entry(tmp_path, name):
    header, data, words = DAMAGED[name]
    path = header_file(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=rf"(?s){name}\.safetensors.*{words}"):
        load_safetensors(path)


@pytest.mark.parametrize("keep", [0, 3, 7])
def test_a_file_shorter_than_the_length_prefix_is_truncated(tmp_path, keep):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\0\0\0\0\0\0\0"[:keep])
    with pytest.raises(SafetensorsError, match="short.safetensors: truncated"):
        load_safetensors(path)


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_a_truncated_file_names_the_file(tmp_path, cut):
    path = tmp_path / "cut.safetensors"
    save_safetensors({"a": np.arange(6.0), "b": np.arange(3, dtype=np.int32)}, path)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(SafetensorsError, match="cut.safetensors.*(past the end|cover)"):
        load_safetensors(path)


def test_a_header_length_past_the_end_of_the_file(tmp_path):
    path = header_file(tmp_path / "huge.safetensors", {}, header_size=10**12)
    with pytest.raises(SafetensorsError, match="huge.safetensors: the header length 1000000000000 points past the end"):
        load_safetensors(path)


def test_a_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(SafetensorsError, match="dir.safetensors is a directory"):
        load_safetensors(tmp_path / "dir.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_safetensors(tmp_path / "nothing.safetensors")


def test_an_empty_file_set_loads(tmp_path):
    header_file(tmp_path / "none.safetensors", {})
    assert load_safetensors(tmp_path / "none.safetensors") == {}
    header_file(tmp_path / "zero.safetensors", {"z": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}})
    assert load_safetensors(tmp_path / "zero.safetensors")["z"].shape == (0, 4)


@pytest.mark.parametrize("tensors, error, words", [
    ({"s": np.array(["text"])}, SafetensorsError, "'s' has dtype <U4"),
    ({"o": np.array([object()])}, SafetensorsError, "'o' has dtype object"),
    ({"c": np.ones(2, dtype=np.complex64)}, SafetensorsError, "'c' has dtype complex64"),
    ({"": np.ones(2)}, SafetensorsError, "name ''"),
    ({"__metadata__": np.ones(2)}, SafetensorsError, "__metadata__"),
    ({3: np.ones(2)}, SafetensorsError, "name 3"),
    ([np.ones(2)], TypeError, "mapping"),
], ids=["str", "object", "complex", "empty-name", "reserved-name", "int-name", "list"])
def test_tensors_that_cannot_be_written_are_named(tmp_path, tensors, error, words):
    with pytest.raises(error, match=words):
        save_safetensors(tensors, tmp_path / "bad.safetensors")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("metadata", [{"n": 1}, ["a"], {1: "x"}], ids=["int-value", "list", "int-key"])
def test_metadata_must_be_strings(tmp_path, metadata):
    with pytest.raises(SafetensorsError, match="metadata"):
        save_safetensors({"a": np.ones(1)}, tmp_path / "m.safetensors", metadata=metadata)


# ----- sharded checkpoints -------------------------------------------------------------------------------------
def tensors_of_sizes(*sizes):
    return {f"layer.{i}.weight": np.full(size, float(i), dtype=np.float32) for i, size in enumerate(sizes)}


def test_sharded_round_trip_packs_shards_in_order_and_writes_transformers_index(tmp_path):
    tensors = tensors_of_sizes(10, 10, 30, 5, 5)  # float32: 40, 40, 120, 20, 20 bytes
    index_path = save_safetensors_sharded(tensors, tmp_path / "ckpt", max_shard_bytes=80)
    assert index_path == str(tmp_path / "ckpt" / "model.safetensors.index.json")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shard = "model-{:05d}-of-00003.safetensors".format
    assert index == {"metadata": {"total_size": 240}, "weight_map": {
        "layer.0.weight": shard(1), "layer.1.weight": shard(1), "layer.2.weight": shard(2),  # 120 > 80: alone
        "layer.3.weight": shard(3), "layer.4.weight": shard(3)}}
    for where in (tmp_path / "ckpt", index_path):
        loaded = load_safetensors_index(where)
        assert list(loaded) == list(tensors)
        for name, value in tensors.items():
            np.testing.assert_array_equal(loaded[name], value)


def test_the_index_opens_each_shard_once_and_only_when_needed(tmp_path):
    save_safetensors_sharded(tensors_of_sizes(4, 4, 4), tmp_path, max_shard_bytes=16)
    loaded = load_safetensors_index(tmp_path)
    assert loaded._shards == {}
    loaded["layer.0.weight"], loaded["layer.0.weight"]
    assert list(loaded._shards) == ["model-00001-of-00003.safetensors"]
    first = loaded._shards["model-00001-of-00003.safetensors"]
    loaded["layer.0.weight"]
    assert loaded._shards["model-00001-of-00003.safetensors"] is first


def test_sharded_files_load_in_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = tensors_of_sizes(8, 8, 8)
    save_safetensors_sharded(tensors, tmp_path, max_shard_bytes=40)
    merged = {}
    for name in sorted(os.listdir(tmp_path)):
        if name.endswith(".safetensors"):
            merged.update(safetensors_numpy.load_file(str(tmp_path / name)))
    assert set(merged) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(merged[name], value)


def write_index(directory, content):
    path = directory / "model.safetensors.index.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("content, words", [
    ("{broken", "not a JSON index"),
    ([1], "must be a JSON object"),
    ({"metadata": {}}, "'weight_map' must be an object"),
    ({"weight_map": ["a"]}, "'weight_map' must be an object"),
    ({"weight_map": {"a": "../escape.safetensors"}}, "'a' maps to '../escape.safetensors'"),
    ({"weight_map": {"a": 7}}, "'a' maps to 7"),
    ({"weight_map": {"a": "gone.safetensors"}}, "shard gone.safetensors .*'a'.* is missing"),
    ({"weight_map": {"a": "m.safetensors"}, "metadata": "x"}, "'metadata' must be an object"),
], ids=["not-json", "list", "no-weight-map", "weight-map-list", "path-escape", "not-a-name", "missing-shard",
        "metadata"])
def test_a_damaged_index_names_the_index_and_the_entry(tmp_path, content, words):
    save_safetensors({"a": np.ones(2)}, tmp_path / "m.safetensors")
    write_index(tmp_path, content)
    with pytest.raises(SafetensorsError, match=rf"(?s)model.safetensors.index.json.*{words}"):
        load_safetensors_index(tmp_path)


def test_an_index_that_puts_a_tensor_in_the_wrong_shard(tmp_path):
    save_safetensors({"a": np.ones(2)}, tmp_path / "m.safetensors")
    index = load_safetensors_index(write_index(tmp_path, {"weight_map": {"a": "m.safetensors", "b": "m.safetensors"}}))
    np.testing.assert_array_equal(index["a"], np.ones(2))
    with pytest.raises(SafetensorsError, match="'b' in m.safetensors, which does not hold it"):
        index["b"]
    with pytest.raises(KeyError, match="'c'"):
        index["c"]


def test_a_missing_index_and_a_directory_without_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        load_safetensors_index(tmp_path)
    (tmp_path / "model.safetensors.index.json").mkdir()
    with pytest.raises(SafetensorsError, match="model.safetensors.index.json is a directory"):
        load_safetensors_index(tmp_path)
