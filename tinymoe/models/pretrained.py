"""`from_pretrained(directory)`: a transformers checkpoint directory -> an HFCausalLM with its weights.

The directory holds config.json and either model.safetensors or a sharded checkpoint
(model.safetensors.index.json and the shards it names), as transformers' save_pretrained and the Hub write
them. bfloat16 tensors are widened by tinymoe.io's reader, then cast to `dtype`. Every key the config
implies must be present with its shape and no other key may be (hf_checkpoint.load_tensors); errors name
the key, the file and the config fields behind the expectation.

Every model_type parse_hf_config knows runs (llama, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe,
deepseek_v3, gpt_oss). Not read: quantized checkpoints (a quantization_config, e.g. GPT-OSS's released MXFP4
experts stored as *_blocks / *_scales, is a ValueError from parse_hf_config); dequantize them to bf16/fp32.
"""
from __future__ import annotations

import json
import os

from ..io import SafetensorsFile, load_safetensors_index
from ..io.safetensors_reader import INDEX_NAME
from .hf_checkpoint import check_names, load_tensors
from .hf_config import parse_hf_config
from .hf_model import HFCausalLM, require_supported

SINGLE_FILE = "model.safetensors"


def read_config(directory) -> dict:
    """The parsed config.json of a checkpoint directory (FileNotFoundError / ValueError naming the path)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"from_pretrained: {directory!r} is not a directory (expected a checkpoint "
                                "directory with config.json and model.safetensors)")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: {directory} has no config.json (found {sorted(os.listdir(directory))})")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"from_pretrained: {path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"from_pretrained: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def open_weights(directory):
    """(mapping {key: array}, file_of(key) -> file name) for model.safetensors or a sharded index."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(index_path):
        index = load_safetensors_index(index_path)
        return index, lambda key: os.path.join(directory, index.weight_map.get(key, INDEX_NAME))
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return SafetensorsFile(single), lambda key: single
    raise FileNotFoundError(f"from_pretrained: {directory} has neither {SINGLE_FILE} nor {INDEX_NAME} "
                            f"(found {sorted(os.listdir(directory))})")


def from_pretrained(directory, dtype="float32", device="cpu") -> HFCausalLM:
    """An HFCausalLM with the weights of the checkpoint in `directory`, every parameter in `dtype`.

    Raises FileNotFoundError (no config.json / weights), ValueError from parse_hf_config (a config field
    tinymoe does not implement), NotImplementedError (a model_type without a tinymoe model yet), and
    CheckpointError (a ValueError: missing, unexpected or mis-shaped tensors, naming key and file).
    """
    config = read_config(directory)
    spec = parse_hf_config(config)
    require_supported(spec.model_type)
    tensors, file_of = open_weights(directory)
    where = f"checkpoint {os.fspath(directory)}"
    check_names(spec, tensors.keys(), file_of, where)  # names only, before the model is allocated
    model = HFCausalLM(config, dtype=dtype, device=device, seed=0)
    load_tensors(model, tensors, file_of, where)
    return model.eval()
