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

ROUTERS = ("softmax", "noisy", "sigmoid", "expert_choice")
ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")
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


def _dtype(value, name):
    return normalize_dtype(value, "cuda", name).name  # float16 is refused later on a CPU layer


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

    def to_dict(self) -> dict:
        return {option.name: getattr(self, option.name) for option in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "MoEConfig":
        unknown = set(values) - {option.name for option in fields(cls)}
        if unknown:
            raise ValueError(f"{_OP}: unknown options {sorted(unknown)}")
        return cls(**values)


def option_names() -> tuple:
    """The field names of MoEConfig, in order."""
    return tuple(option.name for option in fields(MoEConfig))
