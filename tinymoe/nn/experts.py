"""Experts: E feed-forward networks applied to the expert-sorted rows of a routing plan (the modules; the ops
with their hand-written backward are tinymoe.functional.experts).

Rows [offsets[e], offsets[e+1]) of the dispatched buffer xs (M, d) belong to expert e, so each expert is a
few dense matmuls on one contiguous block (weights in torch layout: w1 (E, ff, d), w2 (E, d, ff)).

    SwiGLU (Shazeer 2020; Mixtral):  y = w2 · (silu(w1 · x) ⊙ (w3 · x))
    MLP ("relu" | "gelu" | "silu"):   y = w2 · act(w1 · x + b1) + b2
    expert_bias (GPT-OSS):           y = w2 · (silu(w1 · x + b1) ⊙ (w3 · x + b3)) + b2
    "swiglu_clamped" (GPT-OSS):      h = (clip(w3·x + b3, ±L) + 1) ⊙ g·σ(α·g), g = min(w1·x + b1, L)
"""
from __future__ import annotations

import math

import numpy as np

from ..engine import workspace
from ..engine.backend import normalize_device, normalize_dtype
from ..engine.checks import check_finite, require_int
from ..engine.random import as_generator
from ..functional.experts import joint_gate_up, mlp_experts_unchecked, swiglu_experts_unchecked
from ..functional.gated_experts import gated_experts_unchecked
from . import init
from .module import Module
from .moe_config import ACTIVATIONS, GATED_ACTIVATIONS, MoEConfig  # noqa: F401  (ACTIVATIONS: re-exported)


NON_FINITE_ADVICE = ("check the weights for NaN/inf and the input's scale (float32 overflows above 3.4e38); "
                     "tinymoe.set_finite_checks(False) turns these checks off")


def layer_label(kind: str, name: str) -> str:
    """How error messages name a layer: "MoE" for an unnamed one, "MoE 'blocks.0.ffn'" for a named one."""
    return kind if name in (None, kind) else f"{kind} {name!r}"


class Experts(Module):
    """E independent FFN experts, shaped by `config` (a MoEConfig: n_experts, d_model, d_ff, activation, dtype).

    Parameters: w1 (E, ff, d), w3 (E, ff, d; SwiGLU only), w2 (E, d, ff);
    b1 (E, ff) and b2 (E, d) for the non-gated activations, and b1, b3 (E, ff), b2 (E, d) for gated ones with
    expert_bias. Initialised like torch Linear layers: U(±1/sqrt(d)) for w1, w3, b1, b3 and U(±1/sqrt(ff))
    for w2, b2 (the gated biases are drawn after all weights, so expert_bias=False draws as before).
    """

    def __init__(self, config: MoEConfig, *, device="cpu", generator=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"Experts: config must be a MoEConfig, got {type(config).__name__}")
        self.n_experts, self.d_model, self.d_ff = config.n_experts, config.d_model, config.d_ff
        self.activation = activation = config.activation
        gated = activation in GATED_ACTIVATIONS
        self.expert_bias = config.expert_bias
        self.swiglu_alpha, self.swiglu_limit = config.swiglu_alpha, config.swiglu_limit
        dtype = normalize_dtype(config.dtype, normalize_device(device))
        shape_in, shape_out = (self.n_experts, self.d_ff, self.d_model), (self.n_experts, self.d_model, self.d_ff)
        if gated:
            shapes = {"w1": shape_in, "w3": shape_in, "w2": shape_out}
            if config.expert_bias:
                shapes.update({"b1": shape_in[:2], "b3": shape_in[:2], "b2": shape_out[:2]})
        else:
            shapes = {"w1": shape_in, "b1": shape_in[:2], "w2": shape_out, "b2": shape_out[:2]}
        init.require_memory("Experts", shapes, dtype, {"n_experts": self.n_experts, "d_ff": self.d_ff,
                                                       "d_model": self.d_model}, normalize_device(device))
        generator = as_generator(generator)
        in_bound, out_bound = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        self.w1 = init.uniform(shape_in, in_bound, generator, dtype, device)
        if gated:
            self.w3 = init.uniform(shape_in, in_bound, generator, dtype, device)
        else:
            self.b1 = init.uniform((self.n_experts, self.d_ff), in_bound, generator, dtype, device)
        self.w2 = init.uniform(shape_out, out_bound, generator, dtype, device)
        if not gated:
            self.b2 = init.uniform((self.n_experts, self.d_model), out_bound, generator, dtype, device)
        elif config.expert_bias:
            self.b1 = init.uniform((self.n_experts, self.d_ff), in_bound, generator, dtype, device)
            self.b3 = init.uniform((self.n_experts, self.d_ff), in_bound, generator, dtype, device)
            self.b2 = init.uniform((self.n_experts, self.d_model), out_bound, generator, dtype, device)
        self._arrange_parameters()

    def _arrange_parameters(self) -> None:
        """SwiGLU without biases on NumPy: w1 and w3 as the two halves of one (E, 2ff, d) array, so the experts'
        fused gate/up products read w13[e] = [w1[e]; w3[e]] as a view instead of copying it per expert block
        (~2% of a cpu-small training step). Only where a block's copy is large (an expert's w13 of
        workspace.MIN_BYTES or more): below, the copies cost nothing measurable, and `tinymoe train`'s small
        model kept 1.8 MiB more resident with the joined arrays. Values and results are the same either way."""
        if self.activation != "swiglu" or self.expert_bias or self.w1 is self.w3:
            return
        w1, w3 = self.w1.data, self.w3.data
        if (not isinstance(w1, np.ndarray) or not isinstance(w3, np.ndarray) or w1.dtype != w3.dtype
                or w1.shape != w3.shape or 2 * w1[0].nbytes < workspace.MIN_BYTES
                or joint_gate_up(w1, w3) is not None or np.shares_memory(w1, w3)):
            return
        joint = np.empty((w1.shape[0], 2 * self.d_ff, w1.shape[2]), w1.dtype)  # C order, whatever w1's order
        joint[:, :self.d_ff], joint[:, self.d_ff:] = w1, w3
        self.w1.data, self.w3.data = joint[:, :self.d_ff], joint[:, self.d_ff:]

    def forward(self, xs, expert_offsets):
        """xs (M, d) sorted by expert; expert_offsets: host ints (E+1,) → (M, d)."""
        if self.activation == "swiglu" and not self.expert_bias:
            return swiglu_experts_unchecked(xs, self.w1, self.w3, self.w2, expert_offsets)
        if self.activation in GATED_ACTIVATIONS:
            biases = (self.b1, self.b3, self.b2) if self.expert_bias else (None, None, None)
            return gated_experts_unchecked(xs, self.w1, biases[0], self.w3, biases[1], self.w2, biases[2],
                                           expert_offsets, self.activation, self.swiglu_alpha, self.swiglu_limit)
        return mlp_experts_unchecked(xs, self.w1, self.b1, self.w2, self.b2, expert_offsets, self.activation)

    def extra_repr(self):
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class SwiGLU(Module):
    """A dense SwiGLU feed-forward block, y = w2 (silu(w1 x) ⊙ w3 x), with w1, w3 (ff, d) and w2 (d, ff).

    Used for always-on shared experts (n shared experts of width ff are one block of width n·ff) and
    for dense layers. It runs as a single expert that owns every row. name: used in error messages; a
    non-finite output raises FloatingPointError naming it (see tinymoe.set_finite_checks).
    """

    def __init__(self, d_model, d_ff, dtype="float32", device="cpu", generator=None, name="SwiGLU"):
        super().__init__()
        self.d_model = require_int(d_model, "d_model", "SwiGLU", low=1)
        self.d_ff = require_int(d_ff, "d_ff", "SwiGLU", low=1)
        self.name = name
        shape_in, shape_out = (self.d_ff, self.d_model), (self.d_model, self.d_ff)
        init.require_memory("SwiGLU", {"w1": shape_in, "w3": shape_in, "w2": shape_out}, dtype,
                            {"d_ff": self.d_ff, "d_model": self.d_model}, normalize_device(device))
        generator = as_generator(generator)
        in_bound, out_bound = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        self.w1 = init.uniform(shape_in, in_bound, generator, dtype, device)
        self.w3 = init.uniform(shape_in, in_bound, generator, dtype, device)
        self.w2 = init.uniform(shape_out, out_bound, generator, dtype, device)

    def forward(self, x):
        """x (..., d) → (..., d)."""
        rows = x.reshape(-1, self.d_model)
        offsets = (0, rows.shape[0])
        w1, w3 = self.w1.reshape(1, self.d_ff, self.d_model), self.w3.reshape(1, self.d_ff, self.d_model)
        out = swiglu_experts_unchecked(rows, w1, w3, self.w2.reshape(1, self.d_model, self.d_ff), offsets)
        check_finite(out.data, lambda: f"{layer_label('SwiGLU', self.name)}: output is not finite (NaN or inf); "
                                       f"{NON_FINITE_ADVICE}")
        return out.reshape(*x.shape)

    def extra_repr(self):
        return f"d_model={self.d_model}, d_ff={self.d_ff}"
