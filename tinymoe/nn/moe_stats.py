"""`MoEStats`: the routing statistics of one MoE forward, as host values computed when first read.

MoE (moe.py) and ExpertParallelMoE (expert_parallel.py) set `layer.stats = MoEStats(...)` after each forward;
nothing here syncs the device until a statistic is read.
"""
from __future__ import annotations

import functools

import numpy as np

from ..engine.backend import array_module, to_numpy

__all__ = ["MoEStats"]


class MoEStats:
    """Routing statistics of one forward, as host values, each computed on its first read (and then kept), so
    a forward whose statistics nobody reads syncs nothing for them.

    kept_per_expert (E,) int64: rows each expert processed (after capacity); a host value from the plan.
    requested_per_expert (E,) int64: assignments each expert was asked for (before capacity).
    tokens_per_expert: read-only alias of kept_per_expert (rows processed), the name of earlier releases.
    dropped_fraction: token choice (also top_p, null experts, relu): assignments dropped by capacity (host
    value); expert choice: tokens no expert took. router_entropy: mean over tokens of −Σ_e p log p (nats).
    mean_top1_probability: mean over tokens of max_e p.
    experts_per_token: mean over tokens of the real experts a token chose (valid slots, before capacity): k for
    token choice, variable for expert choice, top_p, null experts and relu. experts_per_token_histogram
    (K+1,) int64: tokens that chose 0, 1, ..., K experts (K = slots per token: top_k, or E for expert
    choice and relu).
    """

    FIELDS = ("kept_per_expert", "requested_per_expert", "dropped_fraction", "router_entropy",
              "mean_top1_probability")  # experts_per_token(_histogram): properties, not yet in as_dict

    def __init__(self, probs, requested, valid, kept_per_expert, n_tokens, dropped_fraction, n_slots=None,
                 expert_choice=None):
        # probs, requested, valid: arrays on the layer's device (valid None for token choice)
        self._probs, self._requested, self._valid = probs, requested, valid
        self._n_tokens, self._plan_dropped = n_tokens, dropped_fraction
        self.kept_per_expert = kept_per_expert.astype(np.int64)
        self._n_slots = n_slots if n_slots is not None else (0 if valid is None else valid.shape[1])
        # a valid mask of token choice (top_p, null experts, relu) drops by capacity like plain token choice
        self._expert_choice = valid is not None if expert_choice is None else expert_choice

    @functools.cached_property
    def experts_per_token_histogram(self) -> np.ndarray:
        if self._valid is None:
            histogram = np.zeros(self._n_slots + 1, dtype=np.int64)
            histogram[self._n_slots] = self._n_tokens
            return histogram
        per_token = self._valid.sum(axis=1)
        return to_numpy(array_module(per_token).bincount(per_token, minlength=self._n_slots + 1)).astype(np.int64)

    @property
    def experts_per_token(self) -> float:
        histogram = self.experts_per_token_histogram
        return float((histogram * np.arange(histogram.size)).sum() / max(int(histogram.sum()), 1))

    @property
    def tokens_per_expert(self) -> np.ndarray:
        """Rows each expert processed: the same array as kept_per_expert."""
        return self.kept_per_expert

    @functools.cached_property
    def requested_per_expert(self) -> np.ndarray:
        return to_numpy(self._requested).astype(np.int64)

    @functools.cached_property
    def dropped_fraction(self) -> float:
        if not self._expert_choice:
            return float(self._plan_dropped)
        tokens_taken = int(to_numpy(self._valid.any(axis=1).sum()))
        return float(1.0 - tokens_taken / self._n_tokens)

    @functools.cached_property
    def _router_summary(self) -> tuple:
        probs, xp = self._probs, array_module(self._probs)
        entropy = -(xp.where(probs > 0, probs * xp.log(xp.where(probs > 0, probs, 1)), 0)).sum(axis=1).mean()
        top1 = probs.max(axis=1).mean()
        return tuple(float(value) for value in to_numpy(xp.stack([entropy, top1])))  # one transfer for both

    @property
    def router_entropy(self) -> float:
        return self._router_summary[0]

    @property
    def mean_top1_probability(self) -> float:
        return self._router_summary[1]

    def as_dict(self) -> dict:
        """Every statistic (and the tokens_per_expert alias) as JSON-ready values."""
        values = {name: getattr(self, name) for name in ("tokens_per_expert", *self.FIELDS)}
        return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in values.items()}

    def __repr__(self):
        return f"MoEStats(kept_per_expert={self.kept_per_expert.tolist()}, dropped_fraction={self.dropped_fraction})"
