"""Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"): turn the dense feed-forward blocks of a trained model into MoE layers whose experts all start
as copies of the block, so that training continues from the dense model's function.

    upcycle(model, n_experts=8, top_k=2)               every dense layer of a MoETransformer or an HFCausalLM
    upcycle(model, 4, 1, layers=[1, 3], noise=0.01)    some layers; noise breaks the experts' symmetry

At step 0 the upcycled model computes the dense model's logits (up to float rounding; see MoE.from_dense:
each token's combine weights sum to 1 over identical experts). The router starts random, as in the paper.

The model is changed in place and returned (its dense blocks are replaced; attention, norms and embeddings
are the same objects, so an optimizer over them keeps its state for those; the new expert and router
parameters need a new optimizer or param group). Its config is replaced by one that describes it:
- MoETransformer: config.moe becomes the upcycled layers' MoEConfig (d_ff = the dense width) and moe_layers
  lists them, so a checkpoint written with the config reloads. A TransformerConfig has one MoEConfig and a
  dense width of moe.d_ff·moe.top_k, so layers left dense need top_k=1, and a model that already has MoE
  layers needs the upcycled ones to have its MoEConfig exactly; otherwise ValueError.
- HFCausalLM: model_type becomes its MoE sibling where transformers' layout expresses the model exactly, so
  save_pretrained writes a checkpoint that transformers and from_pretrained load: qwen3 -> qwen3_moe (any
  layers; the others listed in mlp_only_layers), llama -> mixtral (every layer, no attention biases).
  qwen2 has no such sibling (qwen2_moe always adds a gated shared expert) and raises ValueError, as do the
  cases above that do not map. The router is fixed by those formats: softmax, renormalised top-k, dropless.
"""
from __future__ import annotations

import dataclasses

from ..nn import MoE
from .hf_config import DENSE_TYPES, parse_hf_config
from .hf_model import HFCausalLM
from .transformer import MoETransformer

HF_MOE_SIBLINGS = {"qwen3": "qwen3_moe", "llama": "mixtral"}
_HF_ROUTER = dict(router="softmax", normalize_top_k=True, capacity_factor=None)  # what their checkpoints mean
_LLAMA_ONLY_KEYS = ("mlp_bias", "attention_bias", "pretraining_tp", "architectures")


def upcycle(model, n_experts, top_k, layers="all", *, noise=0.0, generator=None, **moe_options):
    """Replace dense feed-forward blocks of `model` by MoEs of n_experts copies, top_k per token; returns `model`.

    model: a MoETransformer or an HFCausalLM of a dense model_type (llama, qwen3). layers: "all" (every dense
    layer) or a list of dense layer indices. noise, generator: as MoE.from_dense (relative std of the noise
    added to each expert copy; the generator also draws the routers), noise > 0 breaks the step-0 equality.
    moe_options: MoEConfig options of the new layers (MoETransformer only; those that keep the step-0
    equality, see MoE.from_dense). Raises before changing anything when a check fails.
    """
    if isinstance(model, MoETransformer):
        dense = [index for index, block in enumerate(model.blocks) if not block.is_moe]
        indices = _layer_indices(layers, dense, len(model.blocks))
        return _upcycle_transformer(model, n_experts, top_k, indices, noise, generator, moe_options)
    if isinstance(model, HFCausalLM):
        dense = [index for index, layer in enumerate(model.model.layers) if not layer.is_moe]
        indices = _layer_indices(layers, dense, len(model.model.layers))
        return _upcycle_hf(model, n_experts, top_k, indices, noise, generator, moe_options)
    raise TypeError(f"upcycle: model must be a tinymoe.models.MoETransformer or HFCausalLM, got {type(model).__name__}")


def _layer_indices(layers, dense: list, n_layers: int) -> list:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"upcycle: layers={layers!r} must be 'all' or a list of layer indices")
        if not dense:
            raise ValueError("upcycle: the model has no dense feed-forward layer to upcycle (all are MoE already)")
        return list(dense)
    if not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(index, int) and not isinstance(index, bool) for index in layers):
        raise TypeError(f"upcycle: layers={layers!r} must be 'all' or a non-empty list of ints")
    bad = [index for index in layers if not 0 <= index < n_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"upcycle: layers={list(layers)!r} must be distinct indices in 0..{n_layers - 1}")
    not_dense = [index for index in layers if index not in dense]
    if not_dense:
        raise ValueError(f"upcycle: layers {not_dense} are MoE layers already; dense layers are {dense}")
    return sorted(layers)


def _upcycle_transformer(model, n_experts, top_k, indices, noise, generator, moe_options):
    config = model.config
    moes = {index: MoE.from_dense(model.blocks[index].ffn, n_experts, top_k, noise=noise, generator=generator,
                                  name=f"blocks.{index}.ffn", **moe_options) for index in indices}
    moe_config = moes[indices[0]].config
    existing = config.moe_layer_indices()
    if existing and moe_config != config.moe:
        raise ValueError(f"upcycle: the model's MoE layers {existing} have {config.moe}, the upcycled ones would "
                         f"have {moe_config}; a TransformerConfig holds one MoEConfig for all its MoE layers")
    left_dense = sorted(set(range(config.n_layers)) - set(existing) - set(indices))
    if left_dense and moe_config.d_ff * moe_config.top_k != config.moe.d_ff * config.moe.top_k:
        raise ValueError(f"upcycle: layers {left_dense} stay dense with width {config.moe.d_ff * config.moe.top_k}, "
                         f"but the new config would give dense layers moe.d_ff·moe.top_k = "
                         f"{moe_config.d_ff}·{top_k}: upcycle every dense layer, or use top_k=1")
    moe_layers = sorted(existing + indices)
    new_config = dataclasses.replace(config, moe=moe_config,
                                     moe_layers=["all"] if len(moe_layers) == config.n_layers else moe_layers)
    for index, moe in moes.items():
        block = model.blocks[index]
        block.ffn, block.is_moe = moe, True
    model.config = new_config
    return model


def _upcycle_hf(model, n_experts, top_k, indices, noise, generator, moe_options):
    spec = model.spec
    kind = spec.model_type
    if kind not in DENSE_TYPES:
        raise ValueError(f"upcycle: model_type={kind!r} is an MoE type; upcycling starts from a dense one {DENSE_TYPES}")
    if kind not in HF_MOE_SIBLINGS:
        raise ValueError(f"upcycle: model_type={kind!r} has no MoE sibling that stores the upcycled model exactly "
                         "(qwen2_moe always adds a gated shared expert); upcycle llama or qwen3 checkpoints")
    sibling = HF_MOE_SIBLINGS[kind]
    if moe_options:
        raise ValueError(f"upcycle: {sibling} checkpoints fix the router ({_HF_ROUTER}); options "
                         f"{sorted(moe_options)} are for MoETransformer models only")
    if sibling == "mixtral":
        if len(indices) != spec.num_layers:
            raise ValueError(f"upcycle: llama -> mixtral needs every layer upcycled (Mixtral has no dense layers), "
                             f"got layers={indices}; use layers='all'")
        if spec.qkv_bias or spec.out_bias:
            raise ValueError("upcycle: this llama has attention biases (attention_bias=true), which Mixtral lacks")
    moe_flags = tuple(index in indices for index in range(spec.num_layers))
    new_spec = dataclasses.replace(spec, model_type=sibling, moe_layers=moe_flags, n_experts=n_experts, top_k=top_k,
                                   moe_intermediate_size=spec.intermediate_size,
                                   norm_topk_prob=sibling == "qwen3_moe")
    new_config = None
    if model.config is not None:
        new_config = _sibling_config(model.config, sibling, n_experts, top_k, moe_flags)
        parsed = parse_hf_config(new_config)
        differ = [field.name for field in dataclasses.fields(parsed)
                  if getattr(parsed, field.name) != getattr(new_spec, field.name)]
        if differ:
            raise ValueError(f"upcycle: the {sibling} config would describe a different model (fields {differ}); "
                             "this checkpoint's layout has no exact MoE sibling")
    moes = {index: MoE.from_dense(model.model.layers[index].mlp, n_experts, top_k, noise=noise, generator=generator,
                                  name=f"model.layers.{index}.mlp", **_HF_ROUTER) for index in indices}
    for index, moe in moes.items():
        layer = model.model.layers[index]
        layer.mlp, layer.is_moe = moe, True
    model.spec, model.config = new_spec, new_config
    return model


def _sibling_config(config: dict, sibling: str, n_experts: int, top_k: int, moe_flags: tuple) -> dict:
    """The config.json dict of the MoE sibling: the dense one's fields plus the experts' (transformers' names)."""
    if sibling == "qwen3_moe":
        return {**config, "model_type": sibling, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": n_experts,
                "num_experts_per_tok": top_k, "moe_intermediate_size": config["intermediate_size"],
                "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": [index for index, moe in enumerate(moe_flags) if not moe]}
    values = {key: value for key, value in config.items() if key not in _LLAMA_ONLY_KEYS}
    return {**values, "model_type": sibling, "architectures": ["MixtralForCausalLM"], "num_local_experts": n_experts,
            "num_experts_per_tok": top_k}
