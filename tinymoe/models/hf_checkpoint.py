"""Checkpoint names <-> HFCausalLM parameters, the checks of a checkpoint against its config, and writing one.

Names are those of the safetensors files transformers writes and the Hub ships (hf_weights.py,
layout="checkpoint"). Everything outside the feed-forward blocks keeps its name. The blocks map as

    dense  mlp.{gate_proj, up_proj, down_proj}.weight                 -> mlp.w1, mlp.w3, mlp.w2
    MoE    <block>.gate.weight                                       -> mlp.router.weight (E, d)
           <block>.experts.{e}.{gate, up, down}.weight  for e < E     -> mlp.experts.w1 / w3 / w2 [e]

with <block> = block_sparse_moe and expert names w1 / w3 / w2 for Mixtral, mlp and gate_proj / up_proj /
down_proj for Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3. Besides:

    Qwen2-MoE    mlp.shared_expert.{gate,up,down}_proj.weight        -> mlp.shared.w1 / w3 / w2
                 mlp.shared_expert_gate.weight (1, d)                -> mlp.shared_gate
    DeepSeek-V3  mlp.shared_experts.{gate,up,down}_proj.weight       -> mlp.shared.w1 / w3 / w2
                 mlp.gate.e_score_correction_bias (E,)               -> the buffer mlp.router.bias
    GPT-OSS      mlp.router.weight / .bias                           -> mlp.router.weight / logit_bias
                 mlp.experts.gate_up_proj (E, d, 2I), columns gate 0::2, up 1::2 -> experts.w1, w3 (E, I, d)
                 mlp.experts.gate_up_proj_bias (E, 2I), the same interleave      -> experts.b1, b3 (E, I)
                 mlp.experts.down_proj (E, I, d), down_proj_bias (E, d)          -> experts.w2 (E, d, I), b2

A source is a key, a list of E keys (stacked on axis 0) or a `Part` (a key and the slice/transpose of it a
parameter holds). A tied model (tie_word_embeddings) has no lm_head.weight on disk.
"""
from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import numpy as np

from ..engine.backend import to_device, to_numpy
from ..io import atomic_write, save_safetensors, save_safetensors_sharded
from .hf_weights import model_weight_shapes

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}
# Keys older checkpoints carry that hold no weight (recomputed buffers): skipped when loading.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Part(NamedTuple):
    """A parameter that is part of one checkpoint tensor: param = take(tensor); put(tensor, param) writes it back.
    `shape` is the checkpoint tensor's shape (for writing)."""

    key: str
    take: Callable
    put: Callable
    shape: tuple


def _columns(key, start, shape, transpose):
    """The Part of every other last-axis column from `start` of `key` (GPT-OSS's interleaved gate/up),
    transposed (E, d, I) -> (E, I, d) when `transpose`."""
    def take(a):
        a = a[..., start::2]
        return a.transpose(0, 2, 1) if transpose else a

    def put(tensor, value):
        tensor[..., start::2] = value.transpose(0, 2, 1) if transpose else value
    return Part(key, take, put, shape)


def _transposed(key, shape):
    def put(tensor, value):
        tensor[...] = value.transpose(0, 2, 1)
    return Part(key, lambda a: a.transpose(0, 2, 1), put, shape)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config.json (missing, unexpected or mis-shaped tensors)."""


def parameter_sources(model) -> dict:
    """{tinymoe parameter name: checkpoint key, or a list of E keys stacked on axis 0} for every parameter."""
    spec, sources = model.spec, {}
    for name, _ in model.named_parameters():
        sources[name] = name
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        for name in [key for key in sources if key.startswith(prefix + "mlp.")]:
            del sources[name]
        if not layer.is_moe:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sources[f"{prefix}mlp.{ours}"] = f"{prefix}mlp.{theirs}.weight"
            continue
        if spec.model_type == "gpt_oss":
            sources.update(_gpt_oss_sources(spec, prefix))
            continue
        mixtral = spec.model_type == "mixtral"
        block = prefix + ("block_sparse_moe." if mixtral else "mlp.")
        names = {"w1": "w1", "w3": "w3", "w2": "w2"} if mixtral else {"w1": "gate_proj", "w3": "up_proj",
                                                                      "w2": "down_proj"}
        sources[f"{prefix}mlp.router.weight"] = block + "gate.weight"
        for ours, theirs in names.items():
            sources[f"{prefix}mlp.experts.{ours}"] = [f"{block}experts.{e}.{theirs}.weight"
                                                      for e in range(spec.n_experts)]
        if spec.n_shared_experts:
            shared = block + ("shared_expert." if spec.model_type == "qwen2_moe" else "shared_experts.")
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sources[f"{prefix}mlp.shared.{ours}"] = f"{shared}{theirs}.weight"
        if spec.shared_expert_gate:
            sources[f"{prefix}mlp.shared_gate"] = block + "shared_expert_gate.weight"
    unmapped = sorted(set(dict(model.named_parameters())) - set(sources))
    if unmapped:
        raise NotImplementedError(f"HFCausalLM: parameters {unmapped} have no checkpoint name (a layer changed?)")
    return sources


def _gpt_oss_sources(spec, prefix) -> dict:
    """GPT-OSS's fused, transposed, interleaved expert tensors (module docstring) as Parts."""
    block, experts, width, hidden = prefix + "mlp.", spec.n_experts, spec.moe_intermediate_size, spec.hidden_size
    ours = prefix + "mlp."
    gate_up, gate_up_bias = block + "experts.gate_up_proj", block + "experts.gate_up_proj_bias"
    return {ours + "router.weight": block + "router.weight", ours + "router.logit_bias": block + "router.bias",
            ours + "experts.w1": _columns(gate_up, 0, (experts, hidden, 2 * width), True),
            ours + "experts.w3": _columns(gate_up, 1, (experts, hidden, 2 * width), True),
            ours + "experts.b1": _columns(gate_up_bias, 0, (experts, 2 * width), False),
            ours + "experts.b3": _columns(gate_up_bias, 1, (experts, 2 * width), False),
            ours + "experts.w2": _transposed(block + "experts.down_proj", (experts, width, hidden)),
            ours + "experts.b2": block + "experts.down_proj_bias"}


def buffer_sources(model) -> dict:
    """{checkpoint key: MoE layer} of the buffers a checkpoint holds: DeepSeek-V3's e_score_correction_bias
    (the sigmoid router's selection bias, `router.bias`)."""
    if model.spec.model_type != "deepseek_v3":
        return {}
    return {f"model.layers.{index}.mlp.gate.e_score_correction_bias": layer.mlp
            for index, layer in enumerate(model.model.layers) if layer.is_moe}


def _config_summary(spec) -> str:
    fields = ["model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"]
    if spec.n_experts:
        fields += ["n_experts", "moe_intermediate_size"]
    return ", ".join(f"{name}={getattr(spec, name)!r}" for name in fields)


def check_names(spec, names, file_of, where: str) -> None:
    """CheckpointError unless the tensor `names` of a checkpoint are exactly the keys `spec` (an HFModelSpec)
    implies (a tied model may also carry lm_head.weight). file_of(key) names the file holding a key; `where`
    names the checkpoint. Only names are read: no tensor data."""
    expected = model_weight_shapes(spec, layout="checkpoint")
    names = set(names)
    missing = [key for key in expected if key not in names]
    allowed_extra = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    unexpected = sorted(key for key in names - set(expected) - allowed_extra if not key.endswith(IGNORED_SUFFIXES))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            listed = [f"{key} (in {file_of(key)})" for key in unexpected[:8]]
            parts.append(f"{len(unexpected)} unexpected key(s) {listed}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{where}: {'; '.join(parts)}. config.json says {_config_summary(spec)}; does it "
                              "describe these weights?")


def load_tensors(model, tensors, file_of, where: str) -> None:
    """Copy a checkpoint's tensors (a mapping {key: array}, each read once) into the model's parameters, cast
    to their dtype. CheckpointError for wrong names (check_names), shapes, dtypes, or a tied model whose
    lm_head.weight differs from its embeddings; every shape is checked before the error is raised."""
    spec, names = model.spec, set(tensors.keys())
    check_names(spec, names, file_of, where)
    expected = model_weight_shapes(spec, layout="checkpoint")
    parameters, wrong = dict(model.named_parameters()), []

    def read(key):
        array = np.asarray(tensors[key])
        if array.dtype.kind != "f":
            wrong.append(f"{key} in {file_of(key)} holds {array.dtype} values; expected floating-point weights")
        elif array.shape != tuple(expected[key]):
            wrong.append(f"{key} in {file_of(key)} has shape {array.shape} but config.json implies "
                         f"{tuple(expected[key])}")
        else:
            return array
        return None

    for name, source in parameter_sources(model).items():
        parameter = parameters[name]
        array = np.empty(parameter.shape, dtype=parameter.dtype)  # filled in place: no stacked copy
        if isinstance(source, list):  # one checkpoint tensor per expert
            for expert, key in enumerate(source):
                value = read(key)
                if value is not None:
                    array[expert] = value
        elif isinstance(source, Part):  # the shape is checked on the checkpoint tensor, before the slice
            value = read(source.key)
            if value is not None:
                array[...] = source.take(value)
        else:
            value = read(source)
            if value is not None:
                array[...] = value
        if not wrong:  # after the first error only checks continue, so that every bad tensor is named
            current = parameter.data
            if isinstance(current, np.ndarray) and current.shape == array.shape and current.dtype == array.dtype:
                current[...] = array  # into the layer's own layout (e.g. w1|w3 joined): no second copy of it
            else:
                parameter.data = to_device(array, parameter.device)
            parameter.grad = None
    buffers = {key: (moe, read(key)) for key, moe in buffer_sources(model).items()}
    if wrong:
        raise CheckpointError(f"{where}: " + "; ".join(wrong[:8]) + f". config.json says {_config_summary(spec)}")
    for moe, value in buffers.values():
        moe.router.bias = to_device(value.astype(moe.router.bias.dtype), moe.router.weight.device)
    model.parameters_replaced()
    if spec.tie_word_embeddings and "lm_head.weight" in names:
        head, embeddings = np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])
        if head.shape != embeddings.shape or not np.array_equal(head, embeddings):
            raise CheckpointError(f"{where}: config.json says tie_word_embeddings=true but lm_head.weight (in "
                                  f"{file_of('lm_head.weight')}) differs from model.embed_tokens.weight")


def checkpoint_tensors(model) -> dict:
    """The model's weights under checkpoint names (model_weight_shapes order), as NumPy arrays."""
    arrays = {name: to_numpy(parameter.data) for name, parameter in model.named_parameters()}
    tensors = {}
    for name, source in parameter_sources(model).items():
        if isinstance(source, list):
            tensors.update({key: np.ascontiguousarray(arrays[name][e]) for e, key in enumerate(source)})
        elif isinstance(source, Part):
            fused = tensors.setdefault(source.key, np.empty(source.shape, dtype=arrays[name].dtype))
            source.put(fused, arrays[name])
        else:
            tensors[source] = np.ascontiguousarray(arrays[name])
    for key, moe in buffer_sources(model).items():
        tensors[key] = np.ascontiguousarray(to_numpy(moe.router.bias))
    order = model_weight_shapes(model.spec, layout="checkpoint")
    return {key: tensors[key] for key in order}


def save_pretrained(model, directory, config: dict | None = None, bf16: bool = False,
                    max_shard_bytes: int | None = None) -> None:
    """config.json (model.config or `config`, with dtype and architectures set) and model.safetensors.

    bf16=True stores the weights as bfloat16 (dtype "bfloat16" in config.json), as most Hub checkpoints are.
    max_shard_bytes: write shards of at most that many bytes and model.safetensors.index.json instead.
    """
    config = dict(config if config is not None else (model.config or {}))
    if not config:
        raise ValueError("save_pretrained: this model was built from an HFModelSpec; pass config= (the "
                         "config.json dict) to write one")
    if config.get("model_type") != model.spec.model_type:
        raise ValueError(f"save_pretrained: config model_type={config.get('model_type')!r} is not the model's "
                         f"{model.spec.model_type!r}")
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16" if bf16 else model.dtype.name
    config.setdefault("architectures", [ARCHITECTURES[model.spec.model_type]])
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if max_shard_bytes is None:
        save_safetensors(checkpoint_tensors(model), os.path.join(directory, "model.safetensors"),
                         metadata={"format": "pt"}, bf16=bf16)
    else:
        save_safetensors_sharded(checkpoint_tensors(model), directory, max_shard_bytes=max_shard_bytes,
                                 metadata={"format": "pt"}, bf16=bf16)
    with atomic_write(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
