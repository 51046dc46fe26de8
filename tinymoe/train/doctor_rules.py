"""The checks of `tinymoe doctor`: each looks at the evaluations of a run (rows of metrics.jsonl) or its
configuration and returns a Finding (title, evidence numbers, why, next command) or None.

The thresholds are heuristics from common MoE practice, not laws; each says where it comes from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .estimate import format_bytes

OVERFIT_RISE = 0.02
"""Validation loss this far (relative) above its minimum, while the training loss kept falling, reads as
overfitting: the early-stopping rule of thumb (Prechelt 1998, "Early stopping - but when?") with a margin
above the evaluation noise of a few validation batches."""

OVERFIT_MIN_EVALS = 2
"""...and the rise must hold for this many evaluations after the minimum (one bad batch is not a trend)."""

MAX_MEAN_LOAD = 2.0
"""max_e load / mean load above this in a layer is an imbalance worth acting on. Switch Transformer (Fedus et
al. 2021) and ST-MoE (Zoph et al. 2022) train with capacity factors 1.0-2.0: an expert above 2× its share
overflows even the largest of them, so its tokens would be dropped."""

STARVED_EXPERT_SHARE = 0.01
"""An expert given under 1% of a layer's assignments is (nearly) dead: its weights get almost no gradient, the
classic routing collapse of Shazeer et al. 2017 that the load-balance loss exists to prevent."""

DROPPED_FRACTION = 0.05
"""More than 5% of assignments dropped by capacity wastes that share of the tokens' FFN compute; Switch
Transformer reports fewer than 1% dropped at capacity factor 1.0-1.25 with its balance loss."""

ENTROPY_FALL = 0.25
"""Router entropy falling by a quarter of log(E) across the run is reported with a collapse (supporting
evidence only: a router growing confident is also normal learning)."""

MEMORY_FRACTION = 0.8
"""An estimated training step above 80% of the machine's memory leaves too little for NumPy temporaries,
the backward's transient gradients and the rest of the system."""


@dataclass(frozen=True)
class Finding:
    kind: str              # "overfitting" | "routing_collapse" | "dropped_tokens" | "memory" | "rank_imbalance"
    title: str
    evidence: dict         # the numbers (JSON-ready), including the step range they come from
    evidence_text: str     # the same, in one or two sentences
    why: str
    next_command: str
    alternatives: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "title": self.title, "evidence": self.evidence,
                "evidence_text": self.evidence_text, "why": self.why, "next_command": self.next_command,
                "alternatives": list(self.alternatives)}


def _rounded(value, digits=4):
    return round(float(value), digits)


def check_overfitting(rows: list, command) -> Finding | None:
    """Validation loss up >= OVERFIT_RISE from its minimum, above it for >= OVERFIT_MIN_EVALS evaluations, while
    the training loss at the last evaluation is below its value at the minimum."""
    evals = [row for row in rows if _finite(row.get("val_loss")) and _finite(row.get("train_loss"))]
    if len(evals) < OVERFIT_MIN_EVALS + 1:
        return None
    best = min(range(len(evals)), key=lambda index: evals[index]["val_loss"])
    after, first, last = evals[best + 1:], evals[best], evals[-1]
    if len(after) < OVERFIT_MIN_EVALS:
        return None
    rise = last["val_loss"] / first["val_loss"] - 1.0
    if rise < OVERFIT_RISE or not last["train_loss"] < first["train_loss"]:
        return None
    evidence = {"best_step": first["step"], "last_step": last["step"], "best_val_loss": _rounded(first["val_loss"]),
                "last_val_loss": _rounded(last["val_loss"]), "val_rise": _rounded(rise),
                "train_loss_at_best": _rounded(first["train_loss"]), "last_train_loss": _rounded(last["train_loss"]),
                "evals_since_best": len(after)}
    text = (f"validation loss rose {100 * rise:.1f}% from its minimum {first['val_loss']:.4f} (step {first['step']}) "
            f"to {last['val_loss']:.4f} (step {last['step']}, {len(after)} evaluations later) while the training "
            f"loss fell from {first['train_loss']:.4f} to {last['train_loss']:.4f}")
    dropout = command.value("dropout", 0.0)
    return Finding("overfitting", "overfitting: validation loss rising while training loss falls", evidence, text,
                   "the model is memorising the training text; more steps make the validation loss worse",
                   command.with_flags(dropout=min(round(dropout + 0.1, 2), 0.5)),
                   [command.with_flags(steps=int(first["step"])) + "   (stop at the best evaluation)",
                    "tinymoe train --data MORE_TEXT ...   (more data)"])


def check_routing(rows: list, command, n_experts: int | None) -> Finding | None:
    """In the last evaluation window, any layer with max/mean load > MAX_MEAN_LOAD or an expert under
    STARVED_EXPERT_SHARE of the assignments."""
    counted = [row for row in rows if isinstance(row.get("tokens_per_expert"), list) and row["tokens_per_expert"]]
    if not counted:
        return None
    last = counted[-1]
    layers = []
    for index, counts in enumerate(last["tokens_per_expert"]):
        total = sum(counts)
        if not counts or total <= 0:
            continue
        mean = total / len(counts)
        ratio = max(counts) / mean
        starved = [expert for expert, count in enumerate(counts) if count / total < STARVED_EXPERT_SHARE]
        if ratio > MAX_MEAN_LOAD or starved:
            layers.append({"layer": index, "max_over_mean": _rounded(ratio, 3), "starved_experts": starved,
                           "min_share": _rounded(min(counts) / total, 4), "tokens_per_expert": list(counts)})
    if not layers:
        return None
    start = counted[-2]["step"] if len(counted) > 1 else 0
    evidence = {"steps": [start, last["step"]], "layers": layers}
    parts = [f"layer {layer['layer']}: max/mean load {layer['max_over_mean']:.2f}"
             + (f", experts {layer['starved_experts']} under {100 * STARVED_EXPERT_SHARE:.0f}% of tokens "
                f"(lowest share {100 * layer['min_share']:.2f}%)" if layer["starved_experts"] else "")
             for layer in layers]
    text = f"steps {start}-{last['step']}: " + "; ".join(parts)
    entropy = _entropy_trend(counted, n_experts)
    if entropy is not None:
        evidence["router_entropy"] = entropy
        text += (f"; router entropy {entropy['first']:.3f} -> {entropy['last']:.3f} nats"
                 + (" (falling)" if entropy["falling"] else ""))
    aux = command.value("aux_coef", 0.01)
    router = command.value("router", "softmax")
    alternatives = [command.with_flags(router="sigmoid", bias_update_rate=0.001) + "   (DeepSeek-V3 loss-free balance)",
                    command.with_flags(router="expert_choice") + "   (balanced by construction, Zhou et al. 2022)"]
    primary = command.with_flags(aux_coef=round(max(3 * aux, 0.03), 4), jitter=0.01)
    if router == "sigmoid":
        primary = command.with_flags(bias_update_rate=round(2 * (command.value("bias_update_rate", None) or 0.001), 5))
    return Finding("routing_collapse", "routing collapse: a few experts take most tokens", evidence, text,
                   "overloaded experts drop or slow tokens and starved ones stop learning: the layer works "
                   "like fewer, narrower experts", primary, alternatives)


def _entropy_trend(rows: list, n_experts) -> dict | None:
    values = [(row["step"], _mean(row["router_entropy"])) for row in rows if row.get("router_entropy") is not None]
    values = [(step, value) for step, value in values if value is not None]
    if len(values) < 2:
        return None
    scale = math.log(n_experts) if n_experts and n_experts > 1 else 1.0
    first, last = values[0][1], values[-1][1]
    return {"first": _rounded(first), "last": _rounded(last), "steps": [values[0][0], values[-1][0]],
            "falling": first - last > ENTROPY_FALL * scale}


def check_dropped(rows: list, command, capacity_factor, router) -> Finding | None:
    """Any layer's dropped fraction in the last evaluation window above DROPPED_FRACTION."""
    counted = [row for row in rows if isinstance(row.get("dropped_fraction"), list) and row["dropped_fraction"]]
    if not counted:
        return None
    last = counted[-1]
    worst = max(last["dropped_fraction"])
    if not worst > DROPPED_FRACTION:
        return None
    start = counted[-2]["step"] if len(counted) > 1 else 0
    evidence = {"steps": [start, last["step"]], "dropped_fraction": [_rounded(x) for x in last["dropped_fraction"]],
                "worst": _rounded(worst), "capacity_factor": capacity_factor}
    text = (f"steps {start}-{last['step']}: dropped fraction per layer "
            + ", ".join(f"{100 * x:.1f}%" for x in last["dropped_fraction"])
            + f" (capacity factor {capacity_factor if capacity_factor is not None else 'default'})")
    current = capacity_factor if capacity_factor is not None else (command.value("top_k", 2) if router == "expert_choice"
                                                                    else 1.0)
    # enough room for the tokens seen: C must grow by 1/(1 - dropped), rounded up to a quarter
    wanted = math.ceil(4 * current / (1.0 - min(worst, 0.95))) / 4
    alternatives = [command.without("capacity_factor") + "   (dropless: no capacity limit)"] if router != "expert_choice" \
        else []
    alternatives.append(command.with_flags(aux_coef=round(max(3 * command.value("aux_coef", 0.01), 0.03), 4)))
    return Finding("dropped_tokens", "routing inefficiency: tokens dropped by capacity", evidence, text,
                   "a dropped assignment skips its expert: that share of the FFN compute and signal is lost",
                   command.with_flags(capacity_factor=wanted), alternatives)


def check_memory(estimate_of, memory_bytes: int, memory_name: str, command, n_experts: int) -> Finding | None:
    """estimate_of(batch_size, seq_len, expert_parallel) -> Estimate; a finding when the run's step needs more
    than MEMORY_FRACTION of memory_bytes, with the largest batch, sequence length and expert parallelism that fit."""
    batch, seq_len = command.value("batch_size", 16), command.value("seq_len", 64)
    needed = estimate_of(batch, seq_len, 1)
    budget = MEMORY_FRACTION * memory_bytes
    if needed.training_bytes <= budget:
        return None
    fitting_batch = next((b for b in range(batch - 1, 0, -1) if estimate_of(b, seq_len, 1).training_bytes <= budget),
                         None)
    fitting_len = next((n for n in range(seq_len - 1, 0, -1) if estimate_of(batch, n, 1).training_bytes <= budget),
                       None)
    ranks = next((p for p in range(2, n_experts + 1) if n_experts % p == 0
                  and estimate_of(batch, seq_len, p).training_bytes <= budget), None)
    evidence = {"training_bytes": needed.training_bytes, "weights_bytes": needed.weights_bytes,
                "gradients_bytes": needed.gradients_bytes, "optimizer_bytes": needed.optimizer_bytes,
                "activations_bytes": needed.activations_bytes, "memory_bytes": memory_bytes, "memory": memory_name,
                "batch_size": batch, "seq_len": seq_len, "fitting_batch_size": fitting_batch,
                "fitting_seq_len": fitting_len, "fitting_expert_parallel": ranks}
    text = (f"a step of batch {batch} x {seq_len} needs about {format_bytes(needed.training_bytes)} (weights "
            f"{format_bytes(needed.weights_bytes)}, gradients {format_bytes(needed.gradients_bytes)}, AdamW "
            f"{format_bytes(needed.optimizer_bytes)}, activations {format_bytes(needed.activations_bytes)}) of "
            f"{format_bytes(memory_bytes)} {memory_name} ({100 * needed.training_bytes / memory_bytes:.0f}%)")
    options = []
    if fitting_batch:
        options.append(command.with_flags(batch_size=fitting_batch))
    if fitting_len:
        options.append(command.with_flags(seq_len=fitting_len))
    if ranks:
        options.append(command.with_flags(expert_parallel=ranks))
    if not options:
        options = [command.with_flags(batch_size=1) + "   (still too large: a smaller model is needed)"]
    return Finding("memory", "memory: the training step barely fits or does not fit", evidence, text,
                   f"above {100 * MEMORY_FRACTION:.0f}% of memory the machine swaps or the process is killed",
                   options[0], options[1:])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(value):
    if isinstance(value, list):
        numbers = [x for x in value if _finite(x)]
        return sum(numbers) / len(numbers) if numbers else None
    return float(value) if _finite(value) else None
