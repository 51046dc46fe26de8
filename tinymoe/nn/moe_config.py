"""`MoEConfig`: every option of an MoE layer, in one frozen, keyword-only, validated dataclass.

    config = MoEConfig(d_model=64, d_ff=128, n_experts=8, top_k=2, router="softmax", capacity_factor=1.25)
    moe = MoE(config, device="cpu", generator=np.random.default_rng(0))   # or MoE(d_model=64, ...)

Each field carries `metadata`: "help" (one line, also the CLI's help text), "paper" (where the option comes
from), "check" (the field's validator, shared by __post_init__ and the CLI's argument parsers), and, for
the options `tinymoe train` exposes, "flag" (its command-line name). Device and random generator are not
options of the layer: they are arguments of its construction. A new MoE option is added here (plus its
implementation) and appears in MoE, TransformerConfig and the CLI by itself.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields

from ..engine.backend import normalize_dtype
from ..engine.checks import require_int

ROUTERS = ("softmax", "noisy", "sigmoid", "expert_choice", "top_p", "relu")
BALANCES = ("batch", "sequence", "global")  # how the load-balance loss counts f_e (adaptive_losses.py)
ACTIVATIONS = ("swiglu", "gelu", "relu", "silu", "swiglu_clamped")
GATED_ACTIVATIONS = ("swiglu", "swiglu_clamped")  # experts with w1 (gate), w3 (up), w2
CAPACITY_GROUPS = ("batch", "sequence")
_OP = "MoEConfig"


def _positive_int(value, name):
    return require_int(value, name, _OP, low=1)


def _non_negative_int(value, name):
    return require_int(value, name, _OP, low=0)


def _one_of(options):
    def check(value, name):
        if not isinstance(value, str) or value not in options:
            raise ValueError(f"{_OP}: {name}={value!r} is not supported; expected one of {options}")
        return value
    return check


def _flag(value, name):
    if not isinstance(value, bool):  # 'no', 0 and numpy bools are refused: a typo must not read as True
        raise TypeError(f"{_OP}: {name}={value!r} must be True or False (a bool)")
    return value


def _real(value, name, op=_OP) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name}={value!r} must be a real number")
    return float(value)


def positive_finite(value, name, op=_OP) -> float:
    """`value` as a float when it is a real number in (0, inf); TypeError (bools, strings) or ValueError otherwise.

    The check of capacity_factor and bias_update_rate, shared with Router.update_bias(rate=...)."""
    number = _real(value, name, op)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{op}: {name}={value!r} must be a positive finite number")
    return number


def _optional_positive(value, name):
    if value is None:
        return None
    try:
        return positive_finite(value, name)
    except ValueError as error:
        raise ValueError(f"{error} or None") from None


def _unit_interval(value, name):
    number = _real(value, name)
    if not 0.0 <= number < 1.0:  # NaN fails too
        raise ValueError(f"{_OP}: {name}={value!r} must be a number in [0, 1)")
    return number


def _optional_positive_int(value, name):
    return None if value is None else _positive_int(value, name)


def _dtype(value, name):
    return normalize_dtype(value, "cuda", name).name  # float16 is refused later on a CPU layer


def _optional_probability(value, name):
    if value is None:
        return None
    number = _real(value, name)
    if not 0.0 < number <= 1.0:  # NaN fails too
        raise ValueError(f"{_OP}: {name}={value!r} must be a number in (0, 1] or None")
    return number


def _optional_sparsity(value, name):
    return None if value is None else _unit_interval(value, name)


def _factor_above_one(value, name):
    number = positive_finite(value, name)
    if not number > 1.0:
        raise ValueError(f"{_OP}: {name}={value!r} must be greater than 1 (λ grows or shrinks by this factor)")
    return number


def _option(default=MISSING, *, check, help, paper=None, flag=None, choices=None, none_means=None):
    metadata = {"check": check, "help": help, "paper": paper, "flag": flag, "choices": choices,
                "none_means": none_means}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The options of an MoE layer (see each field's metadata["help"] and ["paper"]); validated on creation."""

    d_model: int = _option(check=_positive_int, help="width of the tokens entering and leaving the layer")
    d_ff: int = _option(check=_positive_int, flag="d-ff", help="hidden width of each expert",
                        paper="Shazeer et al. 2017 (experts are feed-forward networks)")
    n_experts: int = _option(check=_positive_int, flag="experts", help="number of routed experts E",
                             paper="Shazeer et al. 2017")
    top_k: int = _option(2, check=_positive_int, flag="top-k",
                         help="experts per token k (router='expert_choice': capacity factor when that is unset)",
                         paper="Shazeer et al. 2017; Switch k=1 (Fedus et al. 2021); Mixtral k=2")
    activation: str = _option("swiglu", check=_one_of(ACTIVATIONS), flag="activation", choices=ACTIVATIONS,
                              help="expert network: gated SwiGLU, or a two-layer MLP with GELU, ReLU or SiLU",
                              paper="SwiGLU: Shazeer 2020; Mixtral")
    router: str = _option("softmax", check=_one_of(ROUTERS), flag="router", choices=ROUTERS,
                          help="how tokens and experts are matched (formulas in tinymoe/nn/router.py)",
                          paper="softmax/noisy: Shazeer et al. 2017; sigmoid: DeepSeek-V3; "
                                "expert_choice: Zhou et al. 2022")
    normalize_top_k: bool = _option(True, check=_flag, flag="normalize-top-k",
                                    help="renormalise the k chosen weights to sum to 1 (Mixtral) or keep raw p "
                                         "(Switch)",
                                    paper="Mixtral (Jiang et al. 2024); Switch (Fedus et al. 2021)")
    capacity_factor: float | None = _option(None, check=_optional_positive, flag="capacity-factor",
                                            none_means="dropless",
                                            help="rows per expert C = ceil(cf·T·k/E); overflowing assignments are "
                                                 "dropped",
                                            paper="GShard (Lepikhin et al. 2020); Switch eq. 3")
    n_shared_experts: int = _option(0, check=_non_negative_int, flag="shared-experts",
                                    help="always-on SwiGLU experts, one block of width n·d_ff",
                                    paper="DeepSeekMoE (Dai et al. 2024); Qwen-MoE")
    jitter: float = _option(0.0, check=_unit_interval, flag="jitter",
                            help="multiply the router input by U(1-j, 1+j) in training (0 = off)",
                            paper="Switch Transformer (Fedus et al. 2021), sec. 2.4")
    bias_update_rate: float | None = _option(None, check=_optional_positive, flag="bias-update-rate",
                                             none_means="off",
                                             help="router='sigmoid': auxiliary-loss-free balance step u per "
                                                  "training forward",
                                             paper="DeepSeek-V3 (Wang et al. 2024, loss-free balancing)")
    # ----- DeepSeek-V3, Qwen2-MoE, GPT-OSS and Switch options (defaults: off, today's behaviour) -----
    n_groups: int = _option(1, check=_positive_int, flag="groups",
                            help="split the experts into n_groups equal groups for group-limited routing "
                                 "(router='softmax' or 'sigmoid'; 1 = off)",
                            paper="DeepSeek-V3 (DeepSeek-AI 2024), node-limited routing; DeepSeek-V2 sec. 2.1.3")
    topk_groups: int | None = _option(None, check=_optional_positive_int, flag="topk-groups", none_means="all groups",
                                      help="only experts of the topk_groups best groups are eligible (a group "
                                           "scores the sum of its top-2 selection scores)",
                                      paper="DeepSeek-V3 (DeepSeek-AI 2024)")
    routed_scaling_factor: float = _option(1.0, check=positive_finite, flag="routed-scaling-factor",
                                           help="multiply the routed experts' combine weights by this factor "
                                                "(after normalisation)",
                                           paper="DeepSeek-V2/V3 (routed_scaling_factor)")
    shared_d_ff: int | None = _option(None, check=_optional_positive_int, flag="shared-d-ff", none_means="n_shared_experts·d_ff",
                                      help="hidden width of the shared-expert block",
                                      paper="Qwen2-MoE (shared_expert_intermediate_size)")
    shared_expert_gate: bool = _option(False, check=_flag, flag="shared-expert-gate",
                                       help="scale the shared experts' output by σ(x·w_gate), w_gate (1, d)",
                                       paper="Qwen2-MoE / Qwen1.5-MoE (shared_expert_gate)")
    router_bias: bool = _option(False, check=_flag, flag="router-bias",
                                help="router logits x·Wᵀ + b with a learned bias b (E,)", paper="GPT-OSS (OpenAI 2025)")
    expert_bias: bool = _option(False, check=_flag, flag="expert-bias",
                                help="gated experts (swiglu, swiglu_clamped) get biases b1, b3 (E, ff) and b2 (E, d)",
                                paper="GPT-OSS (OpenAI 2025)")
    swiglu_alpha: float = _option(1.702, check=positive_finite, flag="swiglu-alpha",
                                  help="activation='swiglu_clamped': gate·σ(alpha·gate)", paper="GPT-OSS (OpenAI 2025)")
    swiglu_limit: float = _option(7.0, check=positive_finite, flag="swiglu-limit",
                                  help="activation='swiglu_clamped': gate clamped at +limit, up to ±limit",
                                  paper="GPT-OSS (OpenAI 2025)")
    capacity_per: str = _option("batch", check=_one_of(CAPACITY_GROUPS), flag="capacity-per", choices=CAPACITY_GROUPS,
                                help="count capacity over all tokens of the batch, or per sequence x[b] of an "
                                     "input (..., L, d) (each sequence its own token group)",
                                paper="GShard (Lepikhin et al. 2020) groups; Switch Transformer (Fedus et al. 2021)")
    # ----- adaptive compute and balance options (defaults: off, today's behaviour) -----
    top_p: float | None = _option(None, check=_optional_probability, flag="top-p", none_means="unset",
                                  help="router='top_p': take experts by probability until their sum reaches "
                                       "top_p (1..top_k of them)",
                                  paper="Huang et al. 2024, Harder Tasks Need More Experts (they use p=0.4)")
    n_null_experts: int = _option(0, check=_non_negative_int, flag="null-experts",
                                  help="router='softmax': m extra router outputs whose experts compute nothing "
                                       "(a token choosing them uses fewer real experts)",
                                  paper="AdaMoE (Zeng et al. 2024)")
    target_sparsity: float | None = _option(None, check=_optional_sparsity, flag="target-sparsity", none_means="1 - top_k/n_experts",
                                            help="router='relu': fraction of zero gates the adaptive L1 "
                                                 "coefficient steers towards",
                                            paper="ReMoE (Wang et al. 2025)")
    l1_coefficient: float = _option(1e-8, check=positive_finite, flag="l1-coefficient",
                                    help="router='relu': initial L1 coefficient λ0 (ReMoE: 1e-8)",
                                    paper="ReMoE (Wang et al. 2025), sec. 3.3")
    l1_update_factor: float = _option(1.2, check=_factor_above_one, flag="l1-update-factor",
                                      help="router='relu': λ ← λ·α^sign(target − sparsity) per update (ReMoE: "
                                           "α = 1.2)",
                                      paper="ReMoE (Wang et al. 2025), eq. 7")
    balance: str = _option("batch", check=_one_of(BALANCES), flag="balance", choices=BALANCES,
                           help="load-balance loss f_e counted per batch, per sequence x[b] of (..., L, d), or "
                                "over every micro-batch of the optimizer step",
                           paper="batch: Switch; sequence: DeepSeek-V3 eq. 17-20; global: Qiu et al. 2025")
    dtype: str = _option("float32", check=_dtype, help="parameter dtype (the router computes in float32 at least)")

    def __post_init__(self):
        for option in fields(self):
            object.__setattr__(self, option.name, option.metadata["check"](getattr(self, option.name), option.name))
        if self.top_k > self.n_experts:
            raise ValueError(f"{_OP}: top_k={self.top_k} must be at most n_experts={self.n_experts}")
        if self.router == "noisy" and self.top_k == self.n_experts:
            raise ValueError(f"{_OP}: router='noisy' needs top_k < n_experts "
                             f"(got top_k={self.top_k}, n_experts={self.n_experts})")
        if self.bias_update_rate is not None and self.router != "sigmoid":
            raise ValueError(f"{_OP}: bias_update_rate applies to router='sigmoid' only (got router={self.router!r})")
        self._check_architecture_options()
        _check_adaptive_options(self)

    def _check_architecture_options(self):
        """Cross-field checks of the DeepSeek-V3 / Qwen2-MoE / GPT-OSS / Switch options."""
        if self.n_groups > 1 or self.topk_groups is not None:
            if self.router not in ("softmax", "sigmoid"):
                raise ValueError(f"{_OP}: n_groups/topk_groups apply to router='softmax' or 'sigmoid' "
                                 f"(got router={self.router!r})")
            if self.n_experts % self.n_groups:
                raise ValueError(f"{_OP}: n_groups={self.n_groups} must divide n_experts={self.n_experts}")
            group_size = self.n_experts // self.n_groups
            if self.n_groups > 1 and group_size < 2:
                raise ValueError(f"{_OP}: n_groups={self.n_groups} leaves {group_size} expert per group; a group "
                                 "scores the sum of its top-2 experts, so each group needs at least 2")
            topk_groups = self.n_groups if self.topk_groups is None else self.topk_groups
            if topk_groups > self.n_groups:
                raise ValueError(f"{_OP}: topk_groups={self.topk_groups} must be at most n_groups={self.n_groups}")
            if self.top_k > topk_groups * group_size:
                raise ValueError(f"{_OP}: top_k={self.top_k} must be at most topk_groups·(n_experts/n_groups) = "
                                 f"{topk_groups * group_size} (the eligible experts)")
        if self.shared_d_ff is not None and self.n_shared_experts == 0:
            raise ValueError(f"{_OP}: shared_d_ff={self.shared_d_ff} needs n_shared_experts >= 1")
        if self.shared_expert_gate and self.n_shared_experts == 0:
            raise ValueError(f"{_OP}: shared_expert_gate=True needs n_shared_experts >= 1")
        if self.router_bias and self.router not in ("softmax", "sigmoid", "expert_choice"):
            raise ValueError(f"{_OP}: router_bias applies to router='softmax', 'sigmoid' or 'expert_choice' "
                             f"(got router={self.router!r})")
        if self.expert_bias and self.activation not in GATED_ACTIVATIONS:
            raise ValueError(f"{_OP}: expert_bias applies to activation in {GATED_ACTIVATIONS} (the "
                             f"{self.activation!r} experts always have biases)")
        if self.activation != "swiglu_clamped" and (self.swiglu_alpha != 1.702 or self.swiglu_limit != 7.0):
            raise ValueError(f"{_OP}: swiglu_alpha/swiglu_limit apply to activation='swiglu_clamped' only "
                             f"(got activation={self.activation!r})")
        if self.capacity_per == "sequence" and (self.capacity_factor is None or self.router == "expert_choice"):
            raise ValueError(f"{_OP}: capacity_per='sequence' needs a token-choice router and a capacity_factor "
                             f"(got router={self.router!r}, capacity_factor={self.capacity_factor})")

    def to_dict(self) -> dict:
        return {option.name: getattr(self, option.name) for option in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "MoEConfig":
        unknown = set(values) - {option.name for option in fields(cls)}
        if unknown:
            raise ValueError(f"{_OP}: unknown options {sorted(unknown)}")
        return cls(**values)


def _check_adaptive_options(config) -> None:
    """Cross-field checks of top_p, n_null_experts, the ReLU-router options and balance."""
    router = config.router
    if (router == "top_p") != (config.top_p is not None):
        raise ValueError(f"{_OP}: top_p={config.top_p!r} is set exactly when router='top_p' (got router={router!r})")
    if config.n_null_experts and router != "softmax":
        raise ValueError(f"{_OP}: n_null_experts={config.n_null_experts} applies to router='softmax' only "
                         f"(got router={router!r})")
    if config.n_null_experts and (config.n_groups > 1 or config.topk_groups is not None or config.router_bias):
        raise ValueError(f"{_OP}: n_null_experts does not combine with n_groups/topk_groups or router_bias yet "
                         f"(got n_groups={config.n_groups}, router_bias={config.router_bias})")
    relu_options = (config.target_sparsity is not None or config.l1_coefficient != 1e-8
                    or config.l1_update_factor != 1.2)
    if relu_options and router != "relu":
        raise ValueError(f"{_OP}: target_sparsity/l1_coefficient/l1_update_factor apply to router='relu' only "
                         f"(got router={router!r})")
    if config.capacity_per == "sequence" and (router in ("top_p", "relu") or config.n_null_experts):
        raise ValueError(f"{_OP}: capacity_per='sequence' does not take the variable-width routers yet (got "
                         f"router={router!r}, n_null_experts={config.n_null_experts})")
    if config.balance == "sequence" and router == "expert_choice":
        raise ValueError(f"{_OP}: balance='sequence' needs a token-choice router (expert choice is balanced by "
                         "construction), got router='expert_choice'")


def option_names() -> tuple:
    """The field names of MoEConfig, in order."""
    return tuple(option.name for option in fields(MoEConfig))
