"""Mixtral-format weights for an MoE layer.

Accepted names (after an optional common prefix such as "model.layers.0.block_sparse_moe."):
  per expert (Mixtral checkpoints):  gate.weight (E, d); experts.{i}.w1.weight (ff, d);
                                     experts.{i}.w3.weight (ff, d); experts.{i}.w2.weight (d, ff)
  fused (transformers >= 5):         gate.weight; experts.gate_up_proj (E, 2·ff, d), gate rows first;
                                     experts.down_proj (E, d, ff)
  optional, sigmoid router only:      gate.e_score_correction_bias (E,) (DeepSeek-V3's selection bias)
They map onto tinymoe's router.weight, experts.w1, experts.w3, experts.w2 (and router.bias) without transposes.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ..engine.backend import to_device

_ROUTER = "gate.weight"
_SELECTION_BIAS = "gate.e_score_correction_bias"
_FUSED = ("experts.gate_up_proj", "experts.down_proj")
_PER_EXPERT = re.compile(r"experts\.(\d+)\.(w1|w2|w3)\.weight$")


def _router_prefixes(state_dict) -> list:
    """Block prefixes ("" or ending in ".") with a router key `<prefix>gate.weight` directly under them, so that
    Qwen2-MoE's `mlp.shared_expert_gate.weight` is not taken for a router."""
    return sorted({key[: -len(_ROUTER)] for key in state_dict
                   if key.endswith(_ROUTER) and (key == _ROUTER or key[-len(_ROUTER) - 1] == ".")})


def _common_prefix(state_dict, prefix):
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(f"load_mixtral: prefix={prefix!r} must be a string such as "
                            "'model.layers.0.block_sparse_moe.'")
        return prefix
    prefixes = _router_prefixes(state_dict)
    if not prefixes:
        raise KeyError(f"load_mixtral: no '{_ROUTER}' key found (keys start with {sorted(state_dict)[:5]})")
    if len(prefixes) > 1:
        raise ValueError(f"load_mixtral: several layers in this state dict ({prefixes}); pass prefix= to pick one")
    return prefixes[0]


def _check_state_dict(state_dict) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_mixtral: state_dict must be a mapping {{name: array}} (e.g. from "
                        f"tinymoe.io.load_safetensors), got {type(state_dict).__name__}")
    bad_keys = [key for key in state_dict if not isinstance(key, str)]
    if bad_keys:
        raise TypeError(f"load_mixtral: state_dict keys must be strings, got {bad_keys[:3]!r}")


def _as_array(key, value) -> np.ndarray:
    """`value` as a NumPy array of real numbers; TypeError naming `key` for strings, objects, None..."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:  # torch bfloat16 tensors raise TypeError here
        raise TypeError(f"load_mixtral: {key} is not a NumPy-convertible array ({error})") from None
    if array.dtype.kind not in "fiu":
        raise TypeError(f"load_mixtral: {key} holds {array.dtype} values ({type(value).__name__}); expected an "
                        "array of floating-point numbers")
    return array


def _require_finite(key, array) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise FloatingPointError(f"load_mixtral: {key} holds {bad} NaN or infinite value(s) of {array.size}")


def _check_layer(moe):
    if moe.experts.activation != "swiglu" or moe.router.kind not in ("softmax", "noisy", "sigmoid"):
        raise ValueError(
            f"load_mixtral: Mixtral layers are token-choice SwiGLU layers; this one has "
            f"activation={moe.experts.activation!r}, router={moe.router.kind!r}"
        )


def mixtral_arrays(moe, state_dict, prefix=None) -> dict:
    """{"router.weight", "experts.w1", "experts.w3", "experts.w2"} as NumPy arrays, checked against `moe`."""
    _check_state_dict(state_dict)
    _check_layer(moe)
    prefix = _common_prefix(state_dict, prefix)
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    n_experts, d_model, d_ff = moe.n_experts, moe.d_model, moe.experts.d_ff
    expected_shapes = {_ROUTER: (n_experts, d_model)}
    if _SELECTION_BIAS in own:
        if moe.router.kind != "sigmoid":
            raise KeyError(f"load_mixtral: {prefix}{_SELECTION_BIAS} is the sigmoid router's selection bias "
                           f"(DeepSeek-V3), but this layer has router={moe.router.kind!r}; build it with "
                           "router='sigmoid'")
        expected_shapes[_SELECTION_BIAS] = (n_experts,)
    if any(key in own for key in _FUSED):
        expected_shapes.update({_FUSED[0]: (n_experts, 2 * d_ff, d_model), _FUSED[1]: (n_experts, d_model, d_ff)})
    else:
        for expert in range(n_experts):
            expected_shapes[f"experts.{expert}.w1.weight"] = (d_ff, d_model)
            expected_shapes[f"experts.{expert}.w3.weight"] = (d_ff, d_model)
            expected_shapes[f"experts.{expert}.w2.weight"] = (d_model, d_ff)
    missing = [prefix + key for key in expected_shapes if key not in own]
    unexpected = [prefix + key for key in own if key not in expected_shapes]
    if missing or unexpected:
        raise KeyError(f"load_mixtral: missing keys {missing}, unexpected keys {unexpected}")
    arrays = {key: _as_array(prefix + key, value) for key, value in own.items()}
    wrong = [f"{prefix}{key}: got {arrays[key].shape}, expected {shape}"
             for key, shape in expected_shapes.items() if arrays[key].shape != shape]
    if wrong:
        raise ValueError("load_mixtral: shape mismatch for " + "; ".join(wrong))
    for key, array in arrays.items():  # a full pass over the data: after the cheap checks
        _require_finite(prefix + key, array)
    if _FUSED[0] in arrays:
        gate_up = arrays[_FUSED[0]]
        w1, w3, w2 = gate_up[:, :d_ff], gate_up[:, d_ff:], arrays[_FUSED[1]]
    else:
        stack = lambda name: np.stack([arrays[f"experts.{e}.{name}.weight"] for e in range(n_experts)])  # noqa: E731
        w1, w3, w2 = stack("w1"), stack("w3"), stack("w2")
    result = {"router.weight": arrays[_ROUTER], "experts.w1": w1, "experts.w3": w3, "experts.w2": w2}
    if _SELECTION_BIAS in arrays:
        result["router.bias"] = arrays[_SELECTION_BIAS]
    return result


def load_mixtral(moe, state_dict, prefix=None) -> None:
    """Copy Mixtral-format weights into `moe` (cast to its dtypes, moved to its device). All keys are checked
    before anything is written."""
    arrays = mixtral_arrays(moe, state_dict, prefix)
    targets = {"router.weight": moe.router.weight, "experts.w1": moe.experts.w1,
               "experts.w3": moe.experts.w3, "experts.w2": moe.experts.w2}
    if "router.bias" in arrays:  # a buffer, not a Parameter: set through the router (which checks it is finite)
        moe.router.bias = to_device(np.array(arrays["router.bias"], dtype=moe.router.bias.dtype), moe.router.weight.device)
    for name, parameter in targets.items():
        current = parameter.data
        if isinstance(current, np.ndarray) and current.shape == np.shape(arrays[name]):
            current[...] = arrays[name]  # into the layer's own arrays, cast (joined w1|w3 stay joined)
        else:  # np.array copies: a parameter must never be a read-only view of a memory-mapped .safetensors file
            parameter.data = to_device(np.array(arrays[name], dtype=parameter.dtype, order="C"), parameter.device)
        parameter.grad = None
    moe.parameters_replaced()


def mixtral_state_dict(moe) -> dict:
    """The layer's weights under Mixtral's per-expert names, as NumPy arrays."""
    _check_layer(moe)
    state = {_ROUTER: moe.router.weight.numpy().copy()}
    w1, w3, w2 = moe.experts.w1.numpy(), moe.experts.w3.numpy(), moe.experts.w2.numpy()
    for expert in range(moe.n_experts):
        state[f"experts.{expert}.w1.weight"] = w1[expert].copy()
        state[f"experts.{expert}.w3.weight"] = w3[expert].copy()
        state[f"experts.{expert}.w2.weight"] = w2[expert].copy()
    return state
