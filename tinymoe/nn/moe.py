"""`MoE`: a Mixture-of-Experts feed-forward layer — where the router and the experts meet.

    routing = router(x)                         who goes where, with what weight (router.py)
    plan    = routing_plan(expert_ids)          stable sort by expert: contiguous rows per expert
    xs      = gather_rows(x, plan)              dispatch: xs[r] = x[row_token[r]]
    ys      = experts(xs, plan.offsets)         one matmul chain per expert block (experts.py)
    y[t]    = Σ_j w[t, j] · ys[row(t, j)]        combine (dropped assignments contribute nothing)
            + shared(x[t])                      always-on shared experts (DeepSeek/Qwen), if any

Dispatch, combine and both their backwards are gathers through the plan's inverse permutation: every
output row has one owner, so results are deterministic and no atomics are needed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..engine.backend import normalize_device, normalize_dtype, to_numpy
from ..engine.checks import require_tensor
from ..engine.random import as_generator
from ..functional.dispatch import CombineRows, GatherRows
from ..kernels.registry import kernel
from .experts import ACTIVATIONS, Experts, SwiGLU
from .module import Module
from .router import ROUTERS, Router


@dataclass
class MoEStats:
    """Routing statistics of the last forward, as host values.

    dropped_fraction: token choice — assignments dropped by capacity; expert choice — tokens no expert took.
    router_entropy: mean over tokens of −Σ_e p log p (nats). mean_top1_probability: mean over tokens of max_e p.
    """

    tokens_per_expert: np.ndarray      # rows each expert processed
    requested_per_expert: np.ndarray   # assignments each expert was asked for (before capacity)
    dropped_fraction: float
    router_entropy: float
    mean_top1_probability: float

    def as_dict(self) -> dict:
        values = asdict(self)
        return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in values.items()}


class MoE(Module):
    """A sparse MoE feed-forward layer: x (..., d_model) → y (..., d_model).

    After each forward: `aux_loss` (load balance, a scalar Tensor), `z_loss` (router z-loss), for
    router="noisy" also `importance_loss` and `load_loss`, and `stats` (MoEStats).
    See router.py for the routing rules and experts.py for the expert networks.
    """

    def __init__(self, d_model, d_ff, n_experts, top_k=2, activation="swiglu", router="softmax", normalize_top_k=True,
                 capacity_factor=None, n_shared_experts=0, jitter=0.0, bias_update_rate=None, dtype="float32",
                 device="cpu", seed=None, name="MoE"):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router={router!r} is not supported; expected one of {ROUTERS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}")
        if isinstance(n_shared_experts, bool) or not isinstance(n_shared_experts, int) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts={n_shared_experts!r} must be a non-negative integer")
        device = normalize_device(device)
        self.dtype = normalize_dtype(dtype, device)
        generator = as_generator(seed, "seed")
        self.name = name
        self.router = Router(d_model, n_experts, top_k, router, normalize_top_k, capacity_factor, jitter,
                             bias_update_rate, self.dtype, device, generator)
        self.experts = Experts(n_experts, d_model, d_ff, activation, self.dtype, device, generator)
        self.n_shared_experts = n_shared_experts
        if n_shared_experts:
            self.shared = SwiGLU(d_model, n_shared_experts * d_ff, self.dtype, device, generator)
        self.d_model, self.n_experts, self.top_k = self.experts.d_model, self.experts.n_experts, self.router.top_k
        self.aux_loss = self.z_loss = self.importance_loss = self.load_loss = None
        self.stats = None

    def forward(self, x):
        require_tensor(x, "x", self.name)
        if x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"{self.name}: x must have last dimension d_model={self.d_model}, got shape {x.shape}")
        if x.dtype != self.experts.w1.dtype:
            raise TypeError(f"{self.name}: x is {x.dtype.name} but the layer is {self.experts.w1.dtype.name}; "
                            "cast with x.astype(...) or build the layer with that dtype")
        if x.device != self.experts.w1.device:
            raise ValueError(f"{self.name}: x is on {x.device!r} but the layer is on {self.experts.w1.device!r}")
        rows = x.reshape(-1, self.d_model)
        if rows.shape[0] == 0:
            raise ValueError(f"{self.name}: x holds no tokens (shape {x.shape})")

        routing = self.router(rows, layer_name=self.name)
        plan = kernel("routing_plan", routing.expert_ids)(
            routing.expert_ids, self.n_experts, routing.capacity, routing.valid)
        dispatched = GatherRows.apply(rows, plan.row_token, plan.assignment_row)
        expert_out = self.experts(dispatched, plan.expert_offsets_host)
        out = CombineRows.apply(expert_out, routing.weights, plan.assignment_row, plan.row_assignment)
        if self.n_shared_experts:
            out = out + self.shared(rows)

        self.aux_loss, self.z_loss = routing.aux_loss, routing.z_loss
        self.importance_loss, self.load_loss = routing.importance_loss, routing.load_loss
        self.stats = _statistics(routing, plan)
        return out.reshape(*x.shape)

    def update_bias(self, rate=None) -> None:
        """Aux-free balance step of the sigmoid router (see Router.update_bias)."""
        self.router.update_bias(rate)

    def reseed(self, seed) -> None:
        """Restart the layer's noise (jitter, noisy gating) from `seed`: makes training-mode forwards repeatable."""
        self.router.generator = as_generator(seed, "seed")

    def load_mixtral(self, state_dict, prefix=None) -> None:
        """Load Mixtral-format weights (per-expert or transformers' fused); see tinymoe.io.mixtral.

        prefix: the layer's key prefix (e.g. "model.layers.3.block_sparse_moe."); found automatically when
        the state dict holds one layer. Keys outside the prefix are ignored, so a whole checkpoint works.
        """
        from ..io.mixtral import load_mixtral

        load_mixtral(self, state_dict, prefix)

    def mixtral_state_dict(self) -> dict:
        """This layer's weights named as in Mixtral checkpoints (per-expert w1/w2/w3), as NumPy arrays."""
        from ..io.mixtral import mixtral_state_dict

        return mixtral_state_dict(self)

    def extra_repr(self):
        return f"name={self.name!r}, shared_experts={self.n_shared_experts}"


def _statistics(routing, plan) -> MoEStats:
    probs = routing.probs.data
    xp = routing.probs.xp
    entropy = -(xp.where(probs > 0, probs * xp.log(xp.where(probs > 0, probs, 1)), 0)).sum(axis=1).mean()
    top1 = probs.max(axis=1).mean()
    requested = to_numpy(routing.requested_per_expert).astype(np.int64)
    entropy, top1 = (float(value) for value in to_numpy(xp.stack([entropy, top1])))
    if routing.valid is not None:
        tokens_taken = int(to_numpy(routing.valid.any(axis=1).sum()))
        dropped = 1.0 - tokens_taken / plan.n_tokens
    else:
        dropped = plan.dropped_fraction
    return MoEStats(tokens_per_expert=plan.kept_per_expert.astype(np.int64), requested_per_expert=requested,
                    dropped_fraction=float(dropped), router_entropy=entropy, mean_top1_probability=top1)
