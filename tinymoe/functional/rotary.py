"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer") with the frequency schedules of Llama,
Llama 3, linear position interpolation and YaRN, as one Function with a hand-written backward.

Each pair of features (a, b) of a query or key at position p is turned by the angle θ = p·ω_i of its
frequency ω_i (and the result multiplied by the attention scaling s, 1 except for YaRN):

    a' = s·(a cos θ − b sin θ)        b' = s·(b cos θ + a sin θ)

The map is s times a rotation, so its transpose is s times the rotation by −θ:

    ga = s·(ga' cos θ + gb' sin θ)    gb = s·(gb' cos θ − ga' sin θ)

Which features pair up is the layout: "half" pairs feature i with i + d/2 (Llama's rotate_half, used by every
transformers model here); "interleaved" pairs 2i with 2i + 1 (GPT-J, and DeepSeek's checkpoints). With
rotary_dim < head_dim only the first rotary_dim features turn; the rest pass through unchanged.

Frequencies: ω_i = base^(−2i/d) for i < d/2 (d = rotary_dim), then rescaled by the rope type:
- "linear" (Chen et al. 2023, position interpolation): ω_i / factor.
- "llama3": wavelengths λ = 2π/ω above L/low_freq_factor are divided by factor, those below
  L/high_freq_factor kept, those between blended with t = (L/λ − low)/(high − low): (1 − t)·ω/factor + t·ω
  (L = original_max_position_embeddings).
- "yarn" (Peng et al. 2023): ω_i = ω_i/factor·(1 − r_i) + ω_i·r_i,
  with the ramp r_i = 1 − clip((i − lo)/(hi − lo))
  whose ends lo, hi are the dimensions turning beta_fast and beta_slow times over L (floored / ceiled unless
  truncate=False); s = attention_factor, or by default m(factor, mscale)/m(factor, mscale_all_dim) when both
  are given, else m(factor, 1), with m(f, μ) = 0.1·μ·ln f + 1 for f > 1 and 1 otherwise.
"""
from __future__ import annotations

import math

import numpy as np

from ..engine.checks import as_index_array, require_int, require_number, require_tensor
from ..engine.function import Function
from ..engine.tensor import Tensor

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYOUTS = ("half", "interleaved")

# Keys of a transformers `rope_parameters` / `rope_scaling` dict that each rope type reads.
_ALLOWED_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "mscale", "mscale_all_dim",
             "beta_fast", "beta_slow", "truncate"},
}
_REQUIRED_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"original_max_position_embeddings"},
}
_IGNORED_KEYS = {"rope_type", "type", "rope_theta"}  # the type itself; the base comes as an argument


def rotary_frequencies(rotary_dim: int, base: float, scaling: dict | None = None, max_positions: int | None = None):
    """(inv_freq, attention_scaling): the rotary_dim/2 frequencies ω_i (a float64 NumPy array) and s.

    rotary_dim: features that rotate (head_dim, or int(head_dim·partial_rotary_factor)); even. base: θ of
    the schedule (transformers' rope_theta). scaling: None or transformers' `rope_parameters` dict (its
    "rope_type", or the legacy "type"; see the module docstring for each type's keys). max_positions:
    the model's max_position_embeddings, needed only by YaRN without a factor (factor = max/original).
    Unknown rope types and keys raise ValueError naming them; nothing is silently ignored.
    """
    op = "rotary_frequencies"
    rotary_dim = require_int(rotary_dim, "rotary_dim", op, low=2)
    if rotary_dim % 2:
        raise ValueError(f"{op}: rotary_dim={rotary_dim} must be even (features rotate in pairs)")
    base = require_number(base, "base", op)
    if base <= 1:
        raise ValueError(f"{op}: base={base!r} must be > 1")
    params = dict(scaling or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{op}: rope_type={rope_type!r} is not implemented; expected one of {ROPE_TYPES}")
    unknown = set(params) - _ALLOWED_KEYS[rope_type] - _IGNORED_KEYS
    if unknown:
        hint = ""
        if "partial_rotary_factor" in unknown:
            hint = " (pass rotary_dim = int(head_dim * partial_rotary_factor) instead)"
        raise ValueError(f"{op}: scaling keys {sorted(unknown)} are not used by rope_type={rope_type!r}{hint}")
    missing = _REQUIRED_KEYS[rope_type] - {key for key, value in params.items() if value is not None}
    if missing:
        raise ValueError(f"{op}: rope_type={rope_type!r} needs scaling keys {sorted(missing)}")

    inv_freq = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / _positive(params["factor"], "factor", op), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, params, op), 1.0
    return _yarn(inv_freq, rotary_dim, base, params, max_positions, op)


def _positive(value, name: str, op: str) -> float:
    value = require_number(value, f"scaling[{name!r}]", op)
    if value <= 0:
        raise ValueError(f"{op}: scaling[{name!r}]={value!r} must be positive")
    return value


def _llama3(inv_freq, params, op):
    factor = _positive(params["factor"], "factor", op)
    low = _positive(params["low_freq_factor"], "low_freq_factor", op)
    high = _positive(params["high_freq_factor"], "high_freq_factor", op)
    if not high > low:
        raise ValueError(f"{op}: llama3 needs high_freq_factor={high} > low_freq_factor={low}")
    context = _positive(params["original_max_position_embeddings"], "original_max_position_embeddings", op)
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    long = wavelength > context / low
    short = wavelength < context / high
    return np.where(long, inv_freq / factor, np.where(short, inv_freq, blended))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv_freq, rotary_dim, base, params, max_positions, op):
    original = _positive(params["original_max_position_embeddings"], "original_max_position_embeddings", op)
    factor = params.get("factor")
    if factor is None:
        if max_positions is None:
            raise ValueError(f"{op}: yarn without scaling['factor'] needs max_positions (factor = max_positions / original)")
        factor = require_int(max_positions, "max_positions", op, low=1) / original
    factor = _positive(factor, "factor", op)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    attention_factor = _positive(attention_factor, "attention_factor", op)
    beta_fast = _positive(params.get("beta_fast") or 32.0, "beta_fast", op)
    beta_slow = _positive(params.get("beta_slow") or 1.0, "beta_slow", op)
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise TypeError(f"{op}: scaling['truncate']={truncate!r} must be a bool")

    def dimension_turning(turns: float) -> float:
        """The (fractional) feature index whose frequency turns `turns` times over the original context."""
        return rotary_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_turning(beta_fast), dimension_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp; avoids dividing by zero
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: the original frequency (extrapolate), 0: divided by factor (interpolate)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def _rotate(xp, x, cos, sin, layout: str, rotary_dim: int):
    """The rotation of the module docstring applied to the first rotary_dim features of x (a new array)."""
    out = x.copy()
    if layout == "half":
        half = rotary_dim // 2
        first, second = x[..., :half], x[..., half:rotary_dim]
        out[..., :half] = first * cos - second * sin
        out[..., half:rotary_dim] = second * cos + first * sin
    else:
        first, second = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        out[..., 0:rotary_dim:2] = first * cos - second * sin
        out[..., 1:rotary_dim:2] = second * cos + first * sin
    return out


class RotaryEmbedding(Function):
    """y = s·R(θ) x on feature pairs; x (B, H, L, Dh), cos/sin (B or 1, 1, L, rotary_dim/2) -> (B, H, L, Dh).

    Backward: the transpose, s·R(−θ) g (cos and s unchanged, sin negated).
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, x, cos, sin, layout, rotary_dim):
        ctx.cos, ctx.sin, ctx.layout, ctx.rotary_dim = cos, sin, layout, rotary_dim
        return _rotate(ctx.xp, x, cos, sin, layout, rotary_dim)

    @staticmethod
    def backward(ctx, grad):
        return _rotate(ctx.xp, grad, ctx.cos, -ctx.sin, ctx.layout, ctx.rotary_dim)


def apply_rotary(x: Tensor, positions, inv_freq, attention_scaling: float = 1.0, layout: str = "half",
                 rotary_dim: int | None = None) -> Tensor:
    """Rotate queries or keys by their positions: x (B, H, L, Dh) -> (B, H, L, Dh).

    positions: integers, (L,) shared by the batch or (B, L) per sequence (absolute positions, e.g. offset by
    the cache length when decoding). inv_freq: the (rotary_dim/2,) frequencies of `rotary_frequencies`.
    attention_scaling: s of `rotary_frequencies` (multiplies the rotated features). layout: "half" or
    "interleaved" (see the module docstring). rotary_dim: defaults to 2·len(inv_freq); must equal it; the
    features from rotary_dim on pass through. Angles are formed in float64, then cast to x's dtype.
    """
    op = "apply_rotary"
    require_tensor(x, "x", op, ndim=4)
    batch, _, length, head_dim = x.shape
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout={layout!r} must be one of {LAYOUTS}")
    frequencies = np.asarray(inv_freq.get() if hasattr(inv_freq, "get") else inv_freq, dtype=np.float64)
    if frequencies.ndim != 1 or frequencies.size == 0:
        raise ValueError(f"{op}: inv_freq must be a non-empty 1-D array, got shape {frequencies.shape}")
    if rotary_dim is None:
        rotary_dim = 2 * frequencies.size
    rotary_dim = require_int(rotary_dim, "rotary_dim", op, low=2, high=head_dim)
    if rotary_dim != 2 * frequencies.size:
        raise ValueError(f"{op}: rotary_dim={rotary_dim} must be 2·len(inv_freq) = {2 * frequencies.size}")
    attention_scaling = require_number(attention_scaling, "attention_scaling", op)
    xp = x.xp
    if isinstance(positions, np.ndarray) and x.device != "cpu":
        positions = xp.asarray(positions)  # host positions (np.arange) are fine for a device tensor
    index = as_index_array(positions, "positions", op, device=x.device)
    if index.shape not in ((length,), (batch, length)):
        raise ValueError(
            f"{op}: positions has shape {index.shape}; expected ({length},) or ({batch}, {length}) for x of shape {x.shape}"
        )
    angles = index.astype(np.float64)[..., None] * xp.asarray(frequencies)  # (L, d/2) or (B, L, d/2)
    angles = angles.reshape((1 if index.ndim == 1 else batch, 1, length, frequencies.size))
    cos = (xp.cos(angles) * attention_scaling).astype(x.dtype)
    sin = (xp.sin(angles) * attention_scaling).astype(x.dtype)
    return RotaryEmbedding.apply(x, cos, sin, layout, rotary_dim)
