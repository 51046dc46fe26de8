"""`estimate(config)`: parameters (total and active per token), FLOPs per token and training memory of a
MoETransformer, computed from its TransformerConfig alone (nothing is built, nothing is allocated).

Notation: V vocab, d d_model, n layers, h heads, S max_seq_len, E experts, k top_k, f d_ff, s shared experts;
a batch of B sequences of length L holds T = B·L tokens, and an MoE layer makes M = T·k_eff assignments
(k_eff = k for token choice, a capacity bound only lowers it; expert choice: k_eff = capacity_factor, or k).

Parameters (exactly what MoETransformer registers; the output head is tied to the token embedding):
    embeddings   V·d + S·d
    per layer    attention 4·d² (q, k, v, out; no biases) + two RMSNorm weights 2·d
    MoE block    router (E+m)·d with m null experts (noisy: 2·E·d; router_bias: + E)
                 + experts E·3·f·d (gated: swiglu, swiglu_clamped; expert_bias: + E·(2·f + d)) or
                   E·(2·f·d + f + d) (MLP)
                 + shared experts 3·F_s·d, F_s = shared_d_ff or s·f (shared_expert_gate: + d)
    dense block  a SwiGLU of width k·f: 3·k·f·d
    final norm   d
Active per token: the same with k_eff of the E experts (the router and shared experts always run; for the
variable-width routers, top_p, relu and null experts, k_eff = top_k, the budget, not the average used).

FLOPs per token, forward: 2 per multiply-add of every matmul a token goes through (the "2·N" rule of Kaplan
et al. 2020, Table 1), counting only matrices (norm weights, biases and the embedding lookup are not
matmuls; the tied head V·d is), plus attention: Q·Kᵀ and P·V are each L·d multiply-adds per token and layer,
4·L·d FLOPs (tinymoe computes the whole L×L square and masks it; Kaplan et al. write 2·n_ctx·d, which counts
the scores only). Training ≈ 3 × forward (the backward computes a gradient for the inputs and one for the
weights of every matmul: twice the forward).

Memory of a training step (bytes: elements × itemsize of the dtype; the router computes in float32 at least):
    weights = gradients = parameters; AdamW: exp_avg + exp_avg_sq = 2 × parameters (parameter dtype).
    activations: what the autograd graph keeps for the backward when the forward ends (tinymoe's nodes keep
    only the arrays their ops saved, not their inputs: a residual sum nobody saved is already freed):
        per layer  8·T·d + 2·T (each RMSNorm's output and normalised copy, and 1/rms; q, k, v; the merged
                   attention output the out projection saved) + B·h·L² (attention probabilities)
                   + MoE: 2·M·d (dispatched rows, expert outputs kept by the combine) + 2·M·f (SwiGLU gate
                     and up; MLP: hidden and slopes) + 2·T·(E+m) router logits and probabilities + T·k
                     weights + shared experts 2·T·F_s ;  dense: 2·T·k·f (gate and up)
                   + dropout > 0: 2·T·d (the two masks)
        once       2·T·d + T (final norm) + T·V (log-probabilities kept by the cross-entropy)
    The backward's transient gradients add about one layer's activations on top; NumPy temporaries are not
    counted. Expert parallelism over P ranks divides the experts' weights, gradients and AdamW state by P
    (each rank keeps its own batch, so activations per rank stay as they are).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..engine.checks import require_int
from ..models.transformer import TransformerConfig
from ..nn.moe_config import GATED_ACTIVATIONS
from ..nn.router import router_dtype

ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq per parameter (Loshchilov & Hutter 2019; tinymoe.optim.AdamW)
TRAINING_FLOPS_FACTOR = 3  # forward + backward ≈ 3 × forward (Kaplan et al. 2020, sec. 2.1)


@dataclass(frozen=True)
class Estimate:
    """What `estimate` computes; every count an exact integer of the formulas in the module docstring."""

    total_parameters: int
    active_parameters: int            # per token
    parameters_by_part: dict          # embeddings, attention, norms, routers, experts, shared_experts, dense_ffn
    active_by_part: dict
    batch_size: int
    seq_len: int
    expert_parallel: int
    forward_flops_per_token: int
    training_flops_per_token: int
    weights_bytes: int                # per rank when expert_parallel > 1
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_by_part: dict         # bytes

    @property
    def training_bytes(self) -> int:
        """Weights + gradients + AdamW state + activations of one (B, L) step."""
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "training_bytes": self.training_bytes}

    def to_text(self) -> str:
        ratio = self.active_parameters / self.total_parameters
        rank = f" per rank (expert parallel over {self.expert_parallel})" if self.expert_parallel > 1 else ""
        lines = [
            f"parameters      {self.total_parameters:,} total, {self.active_parameters:,} active per token "
            f"({100 * ratio:.1f}%)",
            "  by part       " + ", ".join(f"{name} {count:,}" for name, count in self.parameters_by_part.items()
                                           if count),
            f"FLOPs per token {self.forward_flops_per_token:,} forward, {self.training_flops_per_token:,} training "
            f"(sequence length {self.seq_len})",
            f"memory{rank} for batch {self.batch_size} x {self.seq_len}: {format_bytes(self.training_bytes)}",
            f"  weights {format_bytes(self.weights_bytes)}, gradients {format_bytes(self.gradients_bytes)}, "
            f"AdamW state {format_bytes(self.optimizer_bytes)}, activations {format_bytes(self.activations_bytes)}",
        ]
        return "\n".join(lines)


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def as_model_config(config) -> TransformerConfig:
    """A TransformerConfig from itself or from a dict (nested "moe" or the flat MoE keys of earlier releases)."""
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    raise TypeError(f"estimate: config must be a TransformerConfig or a dict, got {type(config).__name__}")


def effective_top_k(moe) -> float:
    """Experts per token on average: top_k, or for expert choice the capacity factor (default top_k), at most E."""
    if moe.router == "expert_choice":
        factor = moe.top_k if moe.capacity_factor is None else moe.capacity_factor
        return min(float(factor), float(moe.n_experts))
    return float(moe.top_k)


def expert_parameters(moe) -> int:
    """Parameters of one routed expert (MoEConfig `moe`)."""
    d, f = moe.d_model, moe.d_ff
    if moe.activation in GATED_ACTIVATIONS:
        return 3 * f * d + (2 * f + d if moe.expert_bias else 0)
    return 2 * f * d + f + d


def _expert_matmul_parameters(moe) -> int:
    return (3 if moe.activation in GATED_ACTIVATIONS else 2) * moe.d_ff * moe.d_model


def shared_width(moe) -> int:
    """Hidden width F_s of the shared-expert block: shared_d_ff, or n_shared_experts · d_ff (0 without any)."""
    if not moe.n_shared_experts:
        return 0
    return moe.n_shared_experts * moe.d_ff if moe.shared_d_ff is None else moe.shared_d_ff


def router_parameters(moe) -> int:
    """Parameters of one layer's router: weight (E+m, d), noise_weight (E, d) for noisy, logit_bias (E,)."""
    outputs = moe.n_experts + moe.n_null_experts
    return (outputs + (moe.n_experts if moe.router == "noisy" else 0)) * moe.d_model + \
        (moe.n_experts if moe.router_bias else 0)


def estimate(config, batch_size: int = 16, seq_len: int | None = None, expert_parallel: int = 1) -> Estimate:
    """Parameters, FLOPs per token and training memory of the MoETransformer of `config` (a TransformerConfig
    or its dict) for batches of `batch_size` sequences of `seq_len` tokens (default: max_seq_len), with the
    experts split over `expert_parallel` ranks (n_experts must be divisible by it). Formulas: module docstring."""
    c = as_model_config(config)
    moe = c.moe
    require_int(batch_size, "batch_size", "estimate", low=1)
    seq_len = c.max_seq_len if seq_len is None else require_int(seq_len, "seq_len", "estimate", low=1)
    if seq_len > c.max_seq_len:
        raise ValueError(f"estimate: seq_len={seq_len} exceeds the model's max_seq_len={c.max_seq_len}")
    require_int(expert_parallel, "expert_parallel", "estimate", low=1)
    if moe.n_experts % expert_parallel:
        raise ValueError(f"estimate: expert_parallel={expert_parallel} must divide n_experts={moe.n_experts}")
    d, V, E, f = c.d_model, c.vocab_size, moe.n_experts, moe.d_ff
    shared_ff = shared_width(moe)
    n_moe = len(c.moe_layer_indices())
    n_dense = c.n_layers - n_moe
    k_eff = effective_top_k(moe)
    routers_per_layer = router_parameters(moe)
    router_matmul = (E + moe.n_null_experts + (E if moe.router == "noisy" else 0)) * d
    dense_width = moe.d_ff * moe.top_k

    total = {
        "embeddings": V * d + c.max_seq_len * d,
        "attention": c.n_layers * 4 * d * d,
        "norms": c.n_layers * 2 * d + d,
        "routers": n_moe * routers_per_layer,
        "experts": n_moe * E * expert_parameters(moe),
        "shared_experts": n_moe * (3 * shared_ff * d + (d if moe.shared_expert_gate else 0)),
        "dense_ffn": n_dense * 3 * dense_width * d,
    }
    active = dict(total, experts=math.ceil(n_moe * k_eff * expert_parameters(moe)))

    matmul_per_token = (c.n_layers * 4 * d * d + n_moe * (router_matmul + k_eff * _expert_matmul_parameters(moe)
                                                          + 3 * shared_ff * d + (d if moe.shared_expert_gate else 0))
                        + n_dense * 3 * dense_width * d + V * d)
    forward_flops = math.ceil(2 * matmul_per_token + c.n_layers * 4 * seq_len * d)

    itemsize = np.dtype(c.dtype).itemsize
    router_itemsize = router_dtype(c.dtype).itemsize
    expert_elements = n_moe * E * expert_parameters(moe)
    other_elements = sum(total.values()) - expert_elements - total["routers"]
    per_rank_elements = other_elements + expert_elements // expert_parallel
    weights = per_rank_elements * itemsize + total["routers"] * router_itemsize

    T = batch_size * seq_len
    M = T * k_eff
    activations = {
        "attention": c.n_layers * ((8 * T * d + 2 * T + batch_size * c.n_heads * seq_len ** 2) * itemsize),
        "dropout": c.n_layers * (2 * T * d if c.dropout > 0 else 0) * itemsize,
        "moe_ffn": math.ceil(n_moe * ((2 * M * d + 2 * M * f + 2 * T * shared_ff) * itemsize
                                      + (2 * T * (E + moe.n_null_experts) + T * moe.top_k) * router_itemsize)),
        "dense_ffn": n_dense * 2 * T * dense_width * itemsize,
        "head": (2 * T * d + T + T * V) * itemsize,
    }
    return Estimate(
        total_parameters=sum(total.values()), active_parameters=sum(active.values()), parameters_by_part=total,
        active_by_part=active, batch_size=batch_size, seq_len=seq_len, expert_parallel=expert_parallel,
        forward_flops_per_token=forward_flops, training_flops_per_token=TRAINING_FLOPS_FACTOR * forward_flops,
        weights_bytes=weights, gradients_bytes=weights, optimizer_bytes=ADAMW_MOMENTS * weights,
        activations_bytes=sum(activations.values()), activations_by_part=activations,
    )


# What `tinymoe estimate` would take (the model options of `tinymoe train`, plus these):
ESTIMATE_FLAGS = {
    "--batch-size N": "sequences per step (default 16)",
    "--seq-len N": "tokens per sequence (default: the model's context length)",
    "--expert-parallel P": "split the experts over P ranks; memory per rank (default 1)",
    "--checkpoint PATH": "read the model config from a checkpoint or run directory instead of the flags",
    "--vocab-size N": "symbols (default 41, the generated corpus; ignored with --checkpoint)",
    "--json": "print Estimate.to_dict() as JSON",
}
