"""The router: how tokens choose experts (or experts choose tokens), with its auxiliary losses.

    z = x_r Wᵀ                      logits (T, E), x_r = x · U(1−j, 1+j) in training (Switch jitter)
    "softmax"        top-k of softmax(z)                 Shazeer et al. 2017; Switch (k=1); Mixtral (k=2)
    "noisy"          top-k of softmax(z + ε·σ(x Wnᵀ))    Shazeer et al. 2017 (noise in training only)
    "sigmoid"        top-k of σ(z) + bias                DeepSeek-V3, auxiliary-loss-free balance
    "expert_choice"  each expert its top-C tokens        Zhou et al. 2022

Capacity: token choice keeps C = min(T, ceil(capacity_factor · T · k / E)) assignments per expert (None =
dropless); expert choice takes C = min(T, ceil(capacity_factor · T / E)) tokens per expert (capacity_factor None
means k). An expert can never be asked for more than T rows, so a factor beyond that acts as dropless.
The router computes in float32 at least (float64 when the layer is float64), whatever the layer's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..engine.backend import normalize_device, to_numpy
from ..engine.checks import check_finite, require_finite_array
from ..engine.random import as_generator, standard_normal, uniform
from ..engine.tensor import Tensor
from . import init
from .gating import ExpertChoice, NoisyLogits, SigmoidTopK, SoftmaxTopK
from .module import Module
from .moe_config import ROUTERS, MoEConfig, positive_finite
from .router_losses import ImportanceLoss, LoadBalanceLoss, NoisyLoadLoss, ZLoss

__all__ = ["ROUTERS", "Router", "Routing", "router_dtype"]


@dataclass
class Routing:
    """What the router decided for one batch of T tokens."""

    expert_ids: object           # (T, K) int; for expert choice K = E and expert_ids[t, e] = e
    weights: Tensor              # (T, K) combine weights (router dtype)
    valid: object                # (T, K) bool of the assignments that exist (expert choice), or None
    capacity: int | None         # rows each expert keeps (None = dropless)
    probs: Tensor                # (T, E) router distribution for the load-balance loss
    logits: Tensor               # (T, E) router logits (before noise)
    requested_per_expert: object  # (E,) int assignments per expert before capacity
    aux_loss: Tensor
    z_loss: Tensor
    importance_loss: Tensor | None = None
    load_loss: Tensor | None = None


def router_dtype(dtype) -> np.dtype:
    """float64 layers route in float64; float32 and float16 layers route in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class Router(Module):
    """Routes tokens as `config` (a MoEConfig) says; `device` and `generator` (a seed or numpy Generator, drawn
    from for the initial weight, jitter and noise) are construction arguments.

    Parameters: weight (E, d) (U(±1/sqrt(d))); noise_weight (E, d) for "noisy" (zeros, as in Shazeer et al.);
    buffer bias (E,) for "sigmoid" (the aux-free balance bias, updated by `update_bias`, never by gradients).
    """

    def __init__(self, config: MoEConfig, *, device="cpu", generator=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"Router: config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.d_model, self.n_experts, self.top_k = config.d_model, config.n_experts, config.top_k
        self.kind, self.normalize_top_k = config.router, config.normalize_top_k
        self.capacity_factor, self.jitter = config.capacity_factor, config.jitter
        self.bias_update_rate = config.bias_update_rate
        self.generator = as_generator(generator)
        compute_dtype = router_dtype(config.dtype)
        shapes = {"weight": (self.n_experts, self.d_model)}
        if self.kind == "noisy":
            shapes["noise_weight"] = shapes["weight"]
        init.require_memory("Router", shapes, compute_dtype, {"n_experts": self.n_experts, "d_model": self.d_model},
                            normalize_device(device))
        bound = 1 / math.sqrt(self.d_model)
        self.weight = init.uniform((self.n_experts, self.d_model), bound, self.generator, compute_dtype, device)
        if self.kind == "noisy":
            self.noise_weight = init.constant((self.n_experts, self.d_model), 0.0, compute_dtype, device)
        if self.kind == "sigmoid":
            self.register_buffer("bias", self.weight.xp.zeros(self.n_experts, dtype=compute_dtype))
        self.last_load = None  # numpy (E,): assignments per expert in the last training forward

    def capacity(self, n_tokens: int):
        """Rows each expert keeps for a batch of n_tokens (None: dropless), at most n_tokens: no expert can be
        asked for more, so a huge factor means dropless (and never overflows an int in a kernel)."""
        if self.kind == "expert_choice":
            factor = self.top_k if self.capacity_factor is None else self.capacity_factor
            return max(1, _clamped_ceil(factor * n_tokens / self.n_experts, n_tokens))
        if self.capacity_factor is None:
            return None
        return _clamped_ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts, n_tokens)

    def forward(self, x, layer_name="MoE"):
        """x (T, d) → Routing. Raises FloatingPointError naming `layer_name` if the logits are not finite."""
        xp, n_tokens = x.xp, x.shape[0]
        routed_input = x.astype(self.weight.dtype)
        if self.training and self.jitter > 0:
            noise = uniform(self.generator, routed_input.shape, xp, routed_input.dtype, 1 - self.jitter, 1 + self.jitter)
            routed_input = routed_input * Tensor(noise)
        logits = F.linear(routed_input, self.weight)
        check_finite(logits.data, lambda: f"{layer_name}: router logits are not finite (NaN or inf); check the "
                                          "input and the router weights (tinymoe.set_finite_checks(False): no checks)")
        capacity = self.capacity(n_tokens)
        valid = importance_loss = load_loss = None
        if self.kind == "softmax":
            probs, weights, expert_ids = SoftmaxTopK.apply(logits, self.top_k, self.normalize_top_k)
        elif self.kind == "noisy":
            noise_logits = F.linear(routed_input, self.noise_weight)
            shape = tuple(logits.shape)
            noise = standard_normal(self.generator, shape, xp, logits.dtype) if self.training else xp.zeros(shape, logits.dtype)
            noisy = NoisyLogits.apply(logits, noise_logits, noise)
            probs, weights, expert_ids = SoftmaxTopK.apply(noisy, self.top_k, self.normalize_top_k)
            importance_loss = ImportanceLoss.apply(weights, expert_ids, self.n_experts)
            load_loss = NoisyLoadLoss.apply(logits, noise_logits, noise, self.top_k)
        elif self.kind == "sigmoid":
            check_finite(self.bias, lambda: f"{layer_name}: the sigmoid router's bias holds NaN or inf (it would "
                                            "collapse the routing); reload or reset router.bias")
            probs, weights, expert_ids = SigmoidTopK.apply(logits, self.bias, self.top_k, self.normalize_top_k)
        else:
            probs, weights, expert_ids, valid = ExpertChoice.apply(logits, capacity)
            capacity = None  # the selection already is the capacity

        counted = expert_ids if valid is None else expert_ids[valid]
        requested = xp.bincount(counted.reshape(-1), minlength=self.n_experts)
        fraction = (requested / max(int(counted.size), 1)).astype(logits.dtype)
        if self.training and self.kind == "sigmoid":
            self.last_load = to_numpy(requested).astype(np.int64)
            if self.bias_update_rate is not None:
                self.update_bias()
        return Routing(
            expert_ids=expert_ids, weights=weights, valid=valid, capacity=capacity, probs=probs, logits=logits,
            requested_per_expert=requested, aux_loss=LoadBalanceLoss.apply(probs, fraction),
            z_loss=ZLoss.apply(logits), importance_loss=importance_loss, load_loss=load_loss,
        )

    def update_bias(self, rate=None) -> None:
        """DeepSeek-V3's balance step: bias_e += u · sign(mean load − load_e), load from the last training forward."""
        if self.kind != "sigmoid":
            raise ValueError(f"update_bias() applies to router='sigmoid' only (this router is {self.kind!r})")
        if rate is None:
            rate = self.bias_update_rate
            if rate is None:
                raise ValueError("update_bias: rate=None and the router has no bias_update_rate; pass rate= "
                                 "(a positive finite number) or set MoEConfig.bias_update_rate")
        else:
            rate = positive_finite(rate, "rate", "update_bias")
        if self.last_load is None:
            raise RuntimeError("update_bias() needs a training-mode forward first (it balances the load it saw)")
        load = self.last_load.astype(np.float64)
        step = rate * np.sign(load.mean() - load)
        self.bias = self.bias + self.weight.xp.asarray(step, dtype=self.bias.dtype)

    def __setattr__(self, name, value):
        if name == "bias" and value is not None and "bias" in self._buffers:
            require_finite_array(value, "bias", "Router")  # a NaN bias would silently collapse the routing
        super().__setattr__(name, value)

    def extra_repr(self):
        return f"{self.kind!r}, d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}"


def _clamped_ceil(rows: float, n_tokens: int) -> int:
    """min(n_tokens, ceil(rows)), computed without math.ceil of a huge (or infinite) float."""
    return n_tokens if not rows < n_tokens else math.ceil(rows)
