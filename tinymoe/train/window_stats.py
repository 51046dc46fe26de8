"""The evaluation window of the training loop: what one metrics.jsonl row sums or averages over the steps since
the previous evaluation, and its JSON form in the checkpoint (so a resumed run writes the same rows).

Per step and MoE layer the loop adds (kept rows per expert (E,), dropped fraction, experts-per-token histogram
(K+1,)) from `micro_batches.moe_counts` (one process; summed over the micro-batches of --grad-accum) or
`ParallelTraining.layer_statistics` (summed over ranks). A row then holds, per layer:

    tokens_per_expert            Σ over the window's steps of the kept rows per expert
    dropped_fraction             mean over the steps of the dropped fraction
    experts_per_token            Σ_n n·h_n / Σ_n h_n, h the window's summed histogram: the mean number of real
                                 experts a token chose (before capacity), over every token of the window
    experts_per_token_histogram  h: tokens that chose 0, 1, ..., K experts (K: top_k; E for expert choice, relu)

experts_per_token is k for plain token choice; it varies with router="top_p", "relu", "expert_choice" and
null experts (`adaptive_compute`), and only then does the progress line show it.
"""
from __future__ import annotations

import numpy as np

from .checkpoint import CheckpointError

VARYING_ROUTERS = ("top_p", "relu", "expert_choice")


def adaptive_compute(model) -> bool:
    """True when some MoE layer of `model` gives tokens a variable number of experts."""
    return any(layer.router.kind in VARYING_ROUTERS or layer.router.n_null_experts for layer in model.moe_layers())


def empty_window(model) -> dict:
    """What the next evaluation row averages: per-step losses, tokens and time, per-layer expert counts, dropped
    fractions and experts-per-token histograms (a list of ints per layer; [] until a step is added)."""
    n_experts = [layer.n_experts for layer in model.moe_layers()]
    return {"loss": [], "aux": [], "z": [], "tokens": 0, "seconds": 0.0,
            "counts": [np.zeros(n, dtype=np.int64) for n in n_experts], "dropped": [[] for _ in n_experts],
            "experts": [[] for _ in n_experts]}


def add_layer_counts(window: dict, layer_counts) -> None:
    """Add one step's per-layer (kept (E,), dropped fraction, histogram (K+1,)) to the window."""
    for index, (kept, dropped, histogram) in enumerate(layer_counts or ()):
        window["counts"][index] += kept
        window["dropped"][index].append(float(dropped))
        window["experts"][index] = _add(window["experts"][index], histogram)


def _add(total: list, histogram) -> list:
    histogram = [int(n) for n in np.asarray(histogram).reshape(-1)]
    size = max(len(total), len(histogram))
    return [(total[i] if i < len(total) else 0) + (histogram[i] if i < len(histogram) else 0) for i in range(size)]


def mean_experts(histogram) -> float:
    """Σ_n n·h_n / Σ_n h_n (0.0 for an empty histogram)."""
    histogram = np.asarray(histogram, dtype=np.float64).reshape(-1)
    return float((histogram * np.arange(histogram.size)).sum() / max(histogram.sum(), 1.0))


def step_experts_per_token(layer_counts) -> float | None:
    """One step's experts per token, averaged over the MoE layers (None without MoE layers)."""
    means = [mean_experts(histogram) for _, _, histogram in layer_counts or ()]
    return float(np.mean(means)) if means else None


def row_fields(window: dict) -> dict:
    """The per-layer routing entries of a metrics row (module docstring)."""
    return {"tokens_per_expert": [counts.tolist() for counts in window["counts"]],
            "dropped_fraction": [float(np.mean(d)) if d else 0.0 for d in window["dropped"]],
            "experts_per_token": [mean_experts(h) for h in window["experts"]],
            "experts_per_token_histogram": [list(h) for h in window["experts"]]}


def window_meta(window: dict) -> dict:
    """The window as JSON-ready values (for the checkpoint's metadata)."""
    return {key: ([c.tolist() for c in value] if key == "counts" else value) for key, value in window.items()}


def window_from_meta(saved, model, path) -> dict:
    """The window saved by `window_meta` (an empty one when None: checkpoints of earlier releases). A window of an
    earlier release has no histograms: they restart empty, so the next row counts the steps after the resume.
    CheckpointError naming `path` when it is damaged."""
    window = empty_window(model)
    if saved is None:
        return window
    try:
        counts = [np.array(c, dtype=np.int64) for c in saved["counts"]]
        if [c.shape for c in counts] != [c.shape for c in window["counts"]]:
            raise ValueError(f"expert counts of shapes {[c.shape for c in counts]}")
        experts = [[int(n) for n in layer] for layer in saved.get("experts", window["experts"])]
        if len(experts) != len(counts):
            raise ValueError(f"{len(experts)} experts-per-token histograms for {len(counts)} MoE layers")
        window.update({key: [float(v) for v in saved[key]] for key in ("loss", "aux", "z")},
                      tokens=int(saved["tokens"]), seconds=float(saved["seconds"]), counts=counts,
                      dropped=[[float(v) for v in layer] for layer in saved["dropped"]], experts=experts)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} has damaged metadata: window {error}") from None
    return window
