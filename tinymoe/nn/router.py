"""The router: how tokens choose experts (or experts choose tokens), with its auxiliary losses.

    z = x_r Wᵀ                      logits (T, E), x_r = x · U(1−j, 1+j) in training (Switch jitter)
    "softmax"        top-k of softmax(z)                 Shazeer et al. 2017; Switch (k=1); Mixtral (k=2)
    "noisy"          top-k of softmax(z + ε·σ(x Wnᵀ))    Shazeer et al. 2017 (noise in training only)
    "sigmoid"        top-k of σ(z) + bias                DeepSeek-V3, auxiliary-loss-free balance
    "expert_choice"  each expert its top-C tokens        Zhou et al. 2022
    "top_p"          experts by p until Σp ≥ top_p       Huang et al. 2024 (adaptive_gating.py)
    "relu"           every expert with relu(z) > 0       ReMoE, Wang et al. 2025 (adaptive_gating.py)
n_null_experts (AdaMoE), balance ("batch", "sequence", "global") and the deferred bias/L1 updates of gradient
accumulation: adaptive_routing.py.

Architecture options (MoEConfig): router_bias: z = x_r Wᵀ + b (GPT-OSS; its softmax over the top-k logits is
"softmax" with normalize_top_k=True, since softmax(z_ids) = p_ids / Σ p_ids); n_groups/topk_groups: top-k
among the experts of the best groups only (DeepSeek-V3, gating.group_limited_selection);
routed_scaling_factor: weights · factor after normalisation (DeepSeek-V3).

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
from . import adaptive_routing
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
    entropy_loss: Tensor | None = None  # router="top_p": mean_t H(p_t) (Huang et al. 2024)
    l1_loss: Tensor | None = None       # router="relu": λ · mean_t Σ_e relu(z_te) (ReMoE)


def router_dtype(dtype) -> np.dtype:
    """float64 layers route in float64; float32 and float16 layers route in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class Router(Module):
    """Routes tokens as `config` (a MoEConfig) says; `device` and `generator` (a seed or numpy Generator, drawn
    from for the initial weight, jitter and noise) are construction arguments.

    Parameters: weight (E, d) (U(±1/sqrt(d))); noise_weight (E, d) for "noisy" (zeros, as in Shazeer et al.);
    buffer bias (E,) for "sigmoid" (the aux-free balance bias, updated by `update_bias`, never by gradients;
    DeepSeek-V3 checkpoints call it e_score_correction_bias); logit_bias (E,) with router_bias (zeros, as GPT-OSS).
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
        shapes = {"weight": (self.n_experts + config.n_null_experts, self.d_model)}  # null experts: extra outputs
        if self.kind == "noisy":
            shapes["noise_weight"] = shapes["weight"]
        init.require_memory("Router", shapes, compute_dtype, {"n_experts": self.n_experts, "d_model": self.d_model},
                            normalize_device(device))
        bound = 1 / math.sqrt(self.d_model)
        self.weight = init.uniform(shapes["weight"], bound, self.generator, compute_dtype, device)
        if self.kind == "noisy":
            self.noise_weight = init.constant(shapes["noise_weight"], 0.0, compute_dtype, device)
        if self.kind == "sigmoid":
            self.register_buffer("bias", self.weight.xp.zeros(self.n_experts, dtype=compute_dtype))
        if config.router_bias:
            self.logit_bias = init.constant((self.n_experts,), 0.0, compute_dtype, device)
        self.groups = None if config.n_groups == 1 and config.topk_groups is None else (
            config.n_groups, config.n_groups if config.topk_groups is None else config.topk_groups)
        self.routed_scaling_factor = config.routed_scaling_factor
        self.last_load = None  # numpy (E,): assignments per expert in the last training forward
        adaptive_routing.init_adaptive_state(self, config)

    def capacity(self, n_tokens: int):
        """Rows each expert keeps for a batch of n_tokens (None: dropless), at most n_tokens: no expert can be
        asked for more, so a huge factor means dropless (and never overflows an int in a kernel)."""
        if self.kind == "expert_choice":
            factor = self.top_k if self.capacity_factor is None else self.capacity_factor
            return max(1, _clamped_ceil(factor * n_tokens / self.n_experts, n_tokens))
        if self.capacity_factor is None:
            return None
        return _clamped_ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts, n_tokens)

    def forward(self, x, layer_name="MoE", sequence_length=None):
        """x (T, d) → Routing. Raises FloatingPointError naming `layer_name` if the logits are not finite.
        sequence_length: tokens per sequence (rows b·L … b·L + L − 1), needed by balance="sequence"."""
        xp, n_tokens = x.xp, x.shape[0]
        routed_input = x.astype(self.weight.dtype)
        if self.training and self.jitter > 0:
            noise = uniform(self.generator, routed_input.shape, xp, routed_input.dtype, 1 - self.jitter, 1 + self.jitter)
            routed_input = routed_input * Tensor(noise)
        logits = F.linear(routed_input, self.weight, getattr(self, "logit_bias", None))
        check_finite(logits.data, lambda: f"{layer_name}: router logits are not finite (NaN or inf); check the "
                                          "input and the router weights (tinymoe.set_finite_checks(False): no checks)")
        capacity = self.capacity(n_tokens)
        valid = importance_loss = load_loss = None
        choice_ids, adaptive_losses = None, {}
        if self.kind == "softmax":
            probs, weights, expert_ids = SoftmaxTopK.apply(logits, self.top_k, self.normalize_top_k, self.groups)
            if self.n_null_experts:
                choice_ids = expert_ids
                expert_ids, valid = adaptive_routing.mask_null_experts(self, expert_ids)
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
            probs, weights, expert_ids = SigmoidTopK.apply(logits, self.bias, self.top_k, self.normalize_top_k,
                                                           self.groups)
        elif self.kind in ("top_p", "relu"):
            probs, weights, expert_ids, valid, choice_ids, adaptive_losses = adaptive_routing.adaptive_gate(self, logits)
        else:
            probs, weights, expert_ids, valid = ExpertChoice.apply(logits, capacity)
            capacity = None  # the selection already is the capacity
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor

        if valid is None:
            requested = xp.bincount(expert_ids.reshape(-1), minlength=self.n_experts)
            fraction = (requested / max(int(expert_ids.size), 1)).astype(logits.dtype)
        else:  # invalid pairs counted under a sentinel expert and dropped: no boolean indexing, no host sync
            sentinel = max(self.n_experts, int(expert_ids.shape[1]))
            counted = xp.where(valid, expert_ids, sentinel).reshape(-1)
            requested = xp.bincount(counted, minlength=sentinel + 1)[:self.n_experts]
            fraction = (requested / xp.maximum(requested.sum(), 1)).astype(logits.dtype)
        if self.training and self.kind == "sigmoid":
            self.last_load = to_numpy(requested).astype(np.int64)
            if adaptive_routing.record_load(self, self.last_load):  # deferred under gradient accumulation
                self.update_bias()
        if self.n_null_experts or self.balance != "batch":
            choice_valid = None if self.n_null_experts else valid
            choice_ids = expert_ids if choice_ids is None else choice_ids
            aux_loss = adaptive_routing.balance_loss(self, probs, choice_ids, choice_valid, sequence_length)
            if self.balance == "global":
                self.last_choice_counts = adaptive_routing.choice_counts(choice_ids, choice_valid, self.n_outputs)
        else:
            aux_loss = LoadBalanceLoss.apply(probs, fraction)
        return Routing(
            expert_ids=expert_ids, weights=weights, valid=valid, capacity=capacity, probs=probs, logits=logits,
            requested_per_expert=requested, aux_loss=aux_loss,
            z_loss=ZLoss.apply(logits), importance_loss=importance_loss, load_loss=load_loss, **adaptive_losses,
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
        load = adaptive_routing.take_load(self).astype(np.float64)  # the step's summed load when deferred
        step = rate * np.sign(load.mean() - load)
        self.bias = self.bias + self.weight.xp.asarray(step, dtype=self.bias.dtype)

    def update_l1_coefficient(self) -> float:
        """router="relu": ReMoE's λ ← λ · α^{sign(target − sparsity)} (see adaptive_routing.update_l1_coefficient)."""
        return adaptive_routing.update_l1_coefficient(self)

    def __setattr__(self, name, value):
        if name == "bias" and value is not None and "bias" in self._buffers:
            require_finite_array(value, "bias", "Router")  # a NaN bias would silently collapse the routing
        super().__setattr__(name, value)

    def extra_repr(self):
        return f"{self.kind!r}, d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}"


def _clamped_ceil(rows: float, n_tokens: int) -> int:
    """min(n_tokens, ceil(rows)), computed without math.ceil of a huge (or infinite) float."""
    return n_tokens if not rows < n_tokens else math.ceil(rows)
