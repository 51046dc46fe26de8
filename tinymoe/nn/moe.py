"""`MoE`: a Mixture-of-Experts feed-forward layer — where the router and the experts meet.

    routing = router(x)                         who goes where, with what weight (router.py)
    plan    = routing_plan(expert_ids)          stable sort by expert: contiguous rows per expert
    xs      = gather_rows(x, plan)              dispatch: xs[r] = x[row_token[r]]
    ys      = experts(xs, plan.offsets)         one matmul chain per expert block (experts.py)
    y[t]    = Σ_j w[t, j] · ys[row(t, j)]        combine (dropped assignments contribute nothing)
            + shared(x[t])                      always-on shared experts (DeepSeek/Qwen), if any
                  · σ(x[t] · w_gate)            with shared_expert_gate (Qwen2-MoE)

capacity_per="sequence": for an input (..., L, d) each sequence is its own token group (GShard): capacity
C = ceil(cf·L·k/E) per expert and sequence, kept by choice rank then token order within the sequence.

Dispatch, combine and both their backwards are gathers through the plan's inverse permutation: every
output row has one owner, so results are deterministic and no atomics are needed.
"""
from __future__ import annotations

from ..engine.backend import array_module, normalize_device, normalize_dtype
from ..engine.checks import check_finite, require_bool, require_number, require_tensor
from ..engine.array_math import stable_argsort
from ..engine.random import as_generator, standard_normal
from ..functional.activations import sigmoid
from ..functional.linear import linear
from ..functional.dispatch import combine_rows_unchecked, gather_rows_unchecked, routing_plan_unchecked
from . import init
from .experts import NON_FINITE_ADVICE, Experts, SwiGLU, layer_label
from .module import Module
from .moe_config import MoEConfig, option_names
from .moe_stats import MoEStats
from .router import Router


class MoE(Module):
    """A sparse MoE feed-forward layer: x (..., d_model) → y (..., d_model).

        MoE(MoEConfig(d_model=64, d_ff=128, n_experts=8, top_k=2), device="cpu", generator=rng)
        MoE(d_model=64, d_ff=128, n_experts=8, top_k=2, router="softmax")     # the options as keywords
        MoE(64, 128, 8, top_k=2)                                              # the three sizes positionally

    The options are those of MoEConfig (validated there). Construction arguments: device ("cpu" or "cuda"),
    generator (an int seed or numpy Generator: initial weights, jitter and router noise; None = unseeded),
    seed (the same, the name of earlier releases), name (used in error messages).
    After each forward: `aux_loss` (load balance, a scalar Tensor), `z_loss` (router z-loss),
    `importance_loss` and `load_loss` (scalar Tensors for router="noisy", None for the other routers),
    `entropy_loss` (router="top_p": mean H(p), Huang et al. 2024), `l1_loss` (router="relu": λ-weighted L1 of
    the gates, ReMoE; λ adapts by `update_l1_coefficient`, see adaptive_routing.py), and
    `stats` (MoEStats, computed when read), and `last_decisions`: the pair (expert_ids (T, K) int, kept (T, K)
    bool) of the routing, T = tokens of x flattened, each token's K slots (expert choice and relu: K = E,
    expert_ids[t, e] = e) and which of them reached an expert (valid and within capacity; False for a dropped,
    unselected or null-expert slot). Arrays of the forward on the layer's device, no host sync; None before
    the first forward. Reading any of the four losses before the first forward raises
    RuntimeError (they describe a forward). A forward whose router logits or output hold NaN or inf raises
    FloatingPointError naming the layer (one reduction per check; `tinymoe.set_finite_checks(False)` turns
    them off). See router.py for the routing rules and experts.py for the expert networks.
    """

    def __init__(self, config=None, *sizes, device="cpu", generator=None, seed=None, name="MoE", **options):
        super().__init__()
        config = _config_from_arguments(config, sizes, options)
        if generator is not None and seed is not None:
            raise TypeError("MoE: pass generator= or seed=, not both (they are the same thing)")
        device = normalize_device(device)
        self.dtype = normalize_dtype(config.dtype, device)
        generator = as_generator(seed, "seed") if generator is None else as_generator(generator)
        self.config, self.name = config, name
        self.router = Router(config, device=device, generator=generator)
        self.experts = Experts(config, device=device, generator=generator)
        self.n_shared_experts = config.n_shared_experts
        if self.n_shared_experts:
            shared_d_ff = self.n_shared_experts * config.d_ff if config.shared_d_ff is None else config.shared_d_ff
            self.shared = SwiGLU(config.d_model, shared_d_ff, self.dtype, device, generator, name=f"{name}.shared")
            if config.shared_expert_gate:  # (1, d), U(±1/sqrt(d)) like torch's Linear(d, 1, bias=False)
                self.shared_gate = init.uniform((1, config.d_model), 1 / config.d_model ** 0.5, generator,
                                                self.dtype, device)
        self.capacity_per = config.capacity_per
        self.d_model, self.n_experts, self.top_k = config.d_model, config.n_experts, config.top_k
        self._losses = None  # (aux, z, importance, load) of the last forward
        self.stats = self.last_decisions = None

    @property
    def label(self) -> str:
        """The layer as error messages name it: "MoE", or "MoE 'blocks.0.ffn'" for a named layer."""
        return layer_label("MoE", self.name)

    def _loss(self, index: int, name: str):
        if self._losses is None:
            raise RuntimeError(f"{self.label}: MoE.{name} is set by a forward; call the layer first")
        return self._losses[index]

    aux_loss = property(lambda self: self._loss(0, "aux_loss"), doc="Load-balance loss of the last forward.")
    z_loss = property(lambda self: self._loss(1, "z_loss"), doc="Router z-loss of the last forward.")
    importance_loss = property(lambda self: self._loss(2, "importance_loss"),
                               doc="Importance loss of the last forward (router='noisy'; None otherwise).")
    load_loss = property(lambda self: self._loss(3, "load_loss"),
                         doc="Smooth load loss of the last forward (router='noisy'; None otherwise).")
    entropy_loss = property(lambda self: self._loss(4, "entropy_loss"),
                            doc="Mean router entropy H(p) of the last forward (router='top_p'; None otherwise).")
    l1_loss = property(lambda self: self._loss(5, "l1_loss"),
                       doc="λ-weighted L1 gate penalty of the last forward (router='relu'; None otherwise).")

    def _checked_rows(self, x, label: str):
        """x's (T, d_model) rows, after checking x against the layer (type, width, dtype, device, tokens);
        expert_parallel.ExpertParallelMoE checks its input with the same method."""
        require_tensor(x, "x", label)
        if x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"{label}: x must have last dimension d_model={self.d_model}, got shape {x.shape}")
        if x.dtype != self.experts.w1.dtype:
            raise TypeError(f"{label}: x is {x.dtype.name} but the layer is {self.experts.w1.dtype.name}; "
                            "cast with x.astype(...) or build the layer with that dtype")
        if x.device != self.experts.w1.device:
            raise ValueError(f"{label}: x is on {x.device!r} but the layer is on {self.experts.w1.device!r}")
        rows = x.reshape(-1, self.d_model)
        if rows.shape[0] == 0:
            raise ValueError(f"{label}: x holds no tokens (shape {x.shape})")
        return rows

    def forward(self, x):
        label = self.label
        rows = self._checked_rows(x, label)
        routing = self.router(rows, layer_name=label, sequence_length=x.shape[-2] if x.ndim >= 2 else None)
        dropped = None
        if self.capacity_per == "sequence":
            if x.ndim < 2:
                raise ValueError(f"{label}: capacity_per='sequence' needs x of shape (..., L, d_model) (each "
                                 f"x[..., :, :] one sequence), got shape {x.shape}")
            kept = sequence_capacity_mask(routing.expert_ids, self.n_experts, x.shape[-2],
                                          self.router.capacity(x.shape[-2]))
            plan = routing_plan_unchecked(routing.expert_ids, self.n_experts, None, kept)
            dropped = 1 - kept.mean()
        else:
            plan = routing_plan_unchecked(routing.expert_ids, self.n_experts, routing.capacity, routing.valid)
        self.last_decisions = (routing.expert_ids, plan.assignment_row >= 0)  # −1: dropped or not valid
        dispatched = gather_rows_unchecked(rows, plan.row_token, token_rows=plan.assignment_row)
        expert_out = self.experts(dispatched, plan.expert_offsets_host)
        out = combine_rows_unchecked(expert_out, plan.assignment_row, routing.weights,
                                     row_assignment=plan.row_assignment)
        if self.n_shared_experts:
            shared = self.shared(rows)
            if hasattr(self, "shared_gate"):
                shared = shared * sigmoid(linear(rows, self.shared_gate))  # (T, d) · (T, 1)
            out = out + shared
        # The logits were finite (the router checked them), so a NaN or inf here comes from the experts.
        check_finite(out.data, lambda: f"{label}: expert output is not finite (NaN or inf); {NON_FINITE_ADVICE}")

        self._losses = (routing.aux_loss, routing.z_loss, routing.importance_loss, routing.load_loss,
                        routing.entropy_loss, routing.l1_loss)
        self.stats = MoEStats(routing.probs.data, routing.requested_per_expert, routing.valid,
                              plan.kept_per_expert, plan.n_tokens,
                              plan.dropped_fraction if dropped is None else dropped,
                              n_slots=routing.expert_ids.shape[1], expert_choice=self.router.kind == "expert_choice")
        return out.reshape(*x.shape)

    @classmethod
    def from_dense(cls, block, n_experts, top_k, *, noise=0.0, generator=None, exact=True, name="MoE",
                   **moe_options) -> "MoE":
        """Sparse upcycling (Komatsuzaki et al. 2022): an MoE whose n_experts experts all start as copies of the
        dense feed-forward `block` (a SwiGLU: w1, w3 (ff, d), w2 (d, ff); or a one-expert Experts of any
        activation, e.g. an MLP with biases), top_k of them per token. d_model, d_ff, activation, expert
        biases and dtype come from the block; moe_options are the other MoEConfig options.

        Step 0 computes the block: y = Σ_j w_j · dense(x) = dense(x) when each token's combine weights sum to 1
        (normalize_top_k=True, router "softmax", "noisy" or "sigmoid", dropless, no null or shared experts,
        routed_scaling_factor 1; anything else raises ValueError, or is allowed with exact=False, documented
        as no longer equal). Equal up to rounding, not bitwise: top_k=1 weights are exactly 1 (p/p), but each
        expert multiplies a subset of the rows and BLAS sums can depend on the row count, and for k > 1 the
        k-term sum rounds (tested to 1e-6 float32, 1e-12 float64, relative). The router is random (U(±1/sqrt(d))
        from `generator`) as in the paper; while the experts are identical the output does not depend on
        the routing, so the router learns from the aux loss only until the experts drift apart.
        noise: std, relative to each expert tensor's std, of independent Gaussian noise added to every copy
        (from `generator`) to break the symmetry; noise > 0 breaks the step-0 equality."""
        if isinstance(block, SwiGLU):
            sources = {"w1": block.w1, "w3": block.w3, "w2": block.w2}
            derived = dict(d_model=block.d_model, d_ff=block.d_ff, activation="swiglu")
        elif isinstance(block, Experts) and block.n_experts == 1:
            sources = dict(block.named_parameters())
            derived = dict(d_model=block.d_model, d_ff=block.d_ff, activation=block.activation,
                           expert_bias=block.expert_bias)
            if block.activation == "swiglu_clamped":
                derived.update(swiglu_alpha=block.swiglu_alpha, swiglu_limit=block.swiglu_limit)
        else:
            raise TypeError(f"MoE.from_dense: block must be a tinymoe.nn.SwiGLU or an Experts with n_experts=1, "
                            f"got {type(block).__name__}")
        derived["dtype"] = sources["w1"].dtype.name
        given = sorted(set(moe_options) & (set(derived) | {"expert_bias", "swiglu_alpha", "swiglu_limit"}))
        if given:
            raise TypeError(f"MoE.from_dense: {given} come from the dense block; do not pass them")
        noise = require_number(noise, "noise", "MoE.from_dense", low=0.0)
        config = _config_from_arguments(None, (), {**moe_options, **derived, "n_experts": n_experts, "top_k": top_k})
        reasons = upcycle_inexact_reasons(config)
        if reasons and require_bool(exact, "exact", "MoE.from_dense"):
            raise ValueError(f"MoE.from_dense: the upcycled layer would not compute the dense block's output at "
                             f"step 0: {'; '.join(reasons)} (pass exact=False to upcycle anyway)")
        generator = as_generator(generator)
        moe = cls(config, device=sources["w1"].device, generator=generator, name=name)
        for key, dense in sources.items():
            target = getattr(moe.experts, key)
            copies = dense.xp.broadcast_to(dense.data.reshape(1, *target.shape[1:]), target.shape).astype(target.dtype)
            if noise > 0:
                copies = copies + noise * float(dense.data.std()) * standard_normal(generator, target.shape,
                                                                                    dense.xp, target.dtype)
            target.data = copies
        moe.parameters_replaced()
        return moe

    def update_bias(self, rate=None) -> None:
        """Aux-free balance step of the sigmoid router (see Router.update_bias)."""
        self.router.update_bias(rate)

    def update_l1_coefficient(self) -> float:
        """ReMoE's adaptive L1 step of the relu router (see Router.update_l1_coefficient); returns the new λ."""
        return self.router.update_l1_coefficient()

    def reseed(self, seed) -> None:
        """Restart the layer's noise (jitter, noisy gating) from `seed`: makes training-mode forwards repeatable."""
        self.router.generator = as_generator(seed, "seed")

    def extra_repr(self):
        return f"name={self.name!r}, shared_experts={self.n_shared_experts}"


def sequence_capacity_mask(expert_ids, n_experts: int, sequence_length: int, capacity: int):
    """(T, K) bool: the assignments kept when each run of `sequence_length` consecutive tokens is its own group.

    Within a group every expert keeps its first `capacity` assignments in choice rank, then token order (the
    per-batch rule of the routing plan, applied to each sequence): a stable sort of the slot-major
    assignments by (group, expert) ranks them, and rank < capacity keeps them.
    """
    xp = array_module(expert_ids)
    n_tokens, top_k = expert_ids.shape
    group = xp.arange(n_tokens, dtype=xp.int64) // sequence_length
    bucket = (group[None, :] * n_experts + expert_ids.T.astype(xp.int64)).reshape(-1)  # slot-major, q = j·T + t
    order = stable_argsort(bucket)  # stable: choice rank, then token order within each (group, expert)
    counts = xp.bincount(bucket, minlength=(n_tokens // sequence_length) * n_experts)
    starts = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(counts)[:-1]])
    rank = xp.arange(bucket.size, dtype=xp.int64) - starts[bucket[order]]
    kept = xp.zeros(bucket.size, dtype=bool)
    kept[order] = rank < capacity
    return kept.reshape(top_k, n_tokens).T


def _config_from_arguments(config, sizes, options) -> MoEConfig:
    """The MoEConfig of MoE(config), MoE(**options) or MoE(d_model, d_ff, n_experts, **options)."""
    if isinstance(config, MoEConfig):
        if sizes or options:
            raise TypeError("MoE: pass a MoEConfig or options, not both; "
                            "use dataclasses.replace(config, ...) to change a config")
        return config
    positional = (() if config is None else (config,)) + sizes
    if len(positional) > 3:
        raise TypeError(f"MoE takes at most d_model, d_ff, n_experts positionally (got {len(positional)} "
                        "values); pass the other options by keyword")
    for option, value in zip(("d_model", "d_ff", "n_experts"), positional):
        if option in options:
            raise TypeError(f"MoE got {option} twice (positionally and by keyword)")
        options[option] = value
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise TypeError(f"MoE got unknown options {unknown}; expected MoEConfig's {list(option_names())}")
    return MoEConfig(**options)


def upcycle_inexact_reasons(config: MoEConfig) -> list:
    """Why an MoE of identical experts with `config` would not compute the expert's output (empty: it would)."""
    reasons = []
    if config.router not in ("softmax", "noisy", "sigmoid"):
        reasons.append(f"router={config.router!r} does not give every token weights summing to 1 (top_p: raw p; "
                       "relu: relu(z); expert_choice: 0..E experts per token)")
    rules = [(not config.normalize_top_k, "normalize_top_k=False keeps the raw top-k p (summing to under 1)"),
             (config.capacity_factor is not None, f"capacity_factor={config.capacity_factor} drops assignments"),
             (config.n_null_experts, f"n_null_experts={config.n_null_experts}: null experts compute nothing"),
             (config.n_shared_experts, f"n_shared_experts={config.n_shared_experts} adds the shared output"),
             (config.routed_scaling_factor != 1.0, f"routed_scaling_factor={config.routed_scaling_factor}")]
    return reasons + [reason for broken, reason in rules if broken]
