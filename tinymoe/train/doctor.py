"""`diagnose(run_dir)`: read a training run (metrics.jsonl, summary.json, the checkpoint's configs) and say what
is wrong with it, with the numbers that show it and the `tinymoe train` line to try next.

    report = diagnose("runs/tinymoe")
    print(report.to_text())            # or json.dumps(report.to_dict())

Checks (thresholds and their sources in doctor_rules.py): overfitting, routing collapse (load imbalance,
starved experts, router entropy when recorded), tokens dropped by capacity, the balance of the rows the ranks
of an expert-parallel run received (doctor_ranks.py), and the memory of a training
step (tinymoe.train.estimate) against the machine's memory. The checkpoint's weights are never read: only
its "meta" entry (np.load opens an .npz lazily, member by member).
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..models.transformer import TransformerConfig
from .checkpoint import FORMAT_VERSION, CheckpointError
from .doctor_ranks import check_rank_balance, rank_imbalance
from .doctor_rules import check_dropped, check_memory, check_overfitting, check_routing
from .estimate import estimate, format_bytes

METRICS_NAME, SUMMARY_NAME, CHECKPOINT_NAME = "metrics.jsonl", "summary.json", "checkpoint.npz"

# `tinymoe train` flags the suggested commands may use: config field -> (flag, the CLI's default).
TRAIN_FLAGS = {
    "steps": ("--steps", 600), "batch_size": ("--batch-size", 16), "seq_len": ("--seq-len", 64),
    "lr": ("--lr", 3e-3), "device": ("--device", "cpu"), "d_model": ("--d-model", 64), "n_layers": ("--layers", 2),
    "n_heads": ("--heads", 4), "dropout": ("--dropout", 0.0), "d_ff": ("--d-ff", 128), "n_experts": ("--experts", 4),
    "top_k": ("--top-k", 2), "activation": ("--activation", "swiglu"), "router": ("--router", "softmax"),
    "capacity_factor": ("--capacity-factor", None), "n_shared_experts": ("--shared-experts", 0),
    "jitter": ("--jitter", 0.0), "bias_update_rate": ("--bias-update-rate", None), "aux_coef": ("--aux-coef", 0.01),
    "expert_parallel": ("--expert-parallel", 1), "grad_accum": ("--grad-accum", 1),
}

# What `tinymoe doctor` would take.
DOCTOR_FLAGS = {
    "RUN_DIR": "a training output directory (metrics.jsonl, summary.json, checkpoint.npz)",
    "--json": "print Report.to_dict() as JSON instead of text",
    "--memory BYTES": "memory to check a step against, e.g. 8G (default: MemTotal of /proc/meminfo)",
}


class TrainCommand:
    """The `tinymoe train` line of a run: its non-default flags, plus changes. `value(name)` reads the run's."""

    def __init__(self, run_dir: str, values: dict):
        self.run_dir = run_dir
        self.out = run_dir.rstrip("/") + "-next"
        self.values = {name: values[name] for name in TRAIN_FLAGS if name in values}

    def value(self, name, default=None):
        return self.values.get(name, TRAIN_FLAGS[name][1] if name in TRAIN_FLAGS else default)

    def with_flags(self, **changes) -> str:
        unknown = set(changes) - set(TRAIN_FLAGS)
        if unknown:
            raise ValueError(f"TrainCommand: no `tinymoe train` flag for {sorted(unknown)}")
        values = {**self.values, **changes}
        words = ["tinymoe", "train", "--out", self.out]
        for name, (flag, default) in TRAIN_FLAGS.items():
            value = values.get(name, default)
            if value is not None and (value != default or name in changes):
                words += [flag, _shown(value)]
        return " ".join(words)

    def without(self, name) -> str:
        return TrainCommand(self.run_dir, {k: v for k, v in self.values.items() if k != name}).with_flags()


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Report:
    run_dir: str
    findings: list            # of Finding
    numbers: dict             # key numbers of the run
    notes: list = field(default_factory=list)   # warnings: torn lines, missing files, what was not checked

    @property
    def healthy(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "healthy": self.healthy, "findings": [f.to_dict() for f in self.findings],
                "numbers": self.numbers, "notes": list(self.notes)}

    def to_text(self) -> str:
        lines = [f"tinymoe doctor {self.run_dir}"]
        lines += [f"note: {note}" for note in self.notes]
        lines.append("key numbers: " + ", ".join(f"{name} {_number_text(name, value)}"
                                                  for name, value in self.numbers.items()))
        if self.healthy:
            lines.append("no problems found")
        for number, finding in enumerate(self.findings, start=1):
            lines += ["", f"{number}. {finding.title}", f"   evidence: {finding.evidence_text}",
                      f"   why: {finding.why}", f"   next: {finding.next_command}"]
            lines += [f"   or:   {alternative}" for alternative in finding.alternatives]
        return "\n".join(lines)


def _number_text(name, value) -> str:
    if isinstance(value, int) and name.endswith("bytes"):
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def read_metrics(path, notes: list) -> list:
    """The rows of a metrics.jsonl; a line that is not a JSON object is skipped with a note (the last one is
    what a run killed mid-write leaves: "torn")."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            what = "torn last line (a write was interrupted)" if number == len(lines) else "unreadable line"
            notes.append(f"{path}: skipped {what} {number}: {line[:60]!r}")
            continue
        rows.append(row)
    return rows


def read_checkpoint_meta(path) -> dict:
    """The "meta" JSON of a tinymoe checkpoint, without reading its weights; CheckpointError naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            if "meta" not in archive.files:
                raise CheckpointError(f"{path} is not a tinymoe checkpoint (no 'meta' entry)")
            meta = json.loads(bytes(archive["meta"]).decode("utf-8"))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: metadata is not a tinymoe checkpoint of format {FORMAT_VERSION}")
    return meta


def machine_memory_bytes(meminfo="/proc/meminfo") -> int | None:
    """MemTotal of /proc/meminfo in bytes, or None where there is none."""
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def diagnose(run_dir, memory_bytes: int | None = None, memory_name: str = "RAM (MemTotal)") -> Report:
    """The Report of the run in `run_dir`. memory_bytes: what a step must fit in (default: this machine's
    MemTotal; a GPU run is still checked against it, and says so)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ValueError(f"diagnose: run_dir={run_dir!r} is not a directory (expected a `tinymoe train --out` DIR)")
    if memory_bytes is not None and (isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int)
                                     or memory_bytes < 1):
        raise ValueError(f"diagnose: memory_bytes={memory_bytes!r} must be a positive int (bytes) or None")
    paths = {name: os.path.join(run_dir, name) for name in (METRICS_NAME, SUMMARY_NAME, CHECKPOINT_NAME)}
    if not any(os.path.isfile(path) for path in paths.values()):
        raise ValueError(f"diagnose: {run_dir} holds none of {list(paths)}; is it a `tinymoe train --out` DIR?")
    notes = []
    rows = read_metrics(paths[METRICS_NAME], notes) if os.path.isfile(paths[METRICS_NAME]) else []
    if not rows:
        notes.append(f"no evaluations in {paths[METRICS_NAME]}: loss and routing were not checked")
    summary = _read_summary(paths[SUMMARY_NAME], notes)
    config, train = _read_configs(paths[CHECKPOINT_NAME], notes)
    if rows and not any("router_entropy" in row for row in rows):
        notes.append("router entropy is not recorded in metrics.jsonl; collapse is judged from the load alone")

    values = dict(train)
    if config is not None:
        values.update(config.moe.to_dict(), d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                      dropout=config.dropout, aux_coef=config.aux_coef)
    command = TrainCommand(run_dir, values)
    n_experts = config.moe.n_experts if config is not None else None
    findings = [check_overfitting(rows, command), check_routing(rows, command, n_experts),
                check_rank_balance(rows, command)]
    if config is not None:
        findings.append(check_dropped(rows, command, config.moe.capacity_factor, config.moe.router))
    numbers = _key_numbers(rows, summary)
    if config is not None:
        memory_bytes = machine_memory_bytes() if memory_bytes is None else memory_bytes
        step = estimate(config, command.value("batch_size"), min(command.value("seq_len"), config.max_seq_len))
        numbers.update(total_parameters=step.total_parameters, active_parameters=step.active_parameters,
                       step_memory_bytes=step.training_bytes)
        if memory_bytes is None:
            notes.append("the machine's memory is unknown (no /proc/meminfo): memory was not checked")
        else:
            if values.get("device") == "cuda":
                notes.append("a cuda run: memory was checked against host RAM, not the GPU's memory")
            numbers["memory_bytes"] = memory_bytes
            findings.append(check_memory(lambda b, n, p: estimate(config, b, min(n, config.max_seq_len), p),
                                         memory_bytes, memory_name, command, config.moe.n_experts))
    return Report(run_dir, [finding for finding in findings if finding is not None], numbers, notes)


def _read_summary(path, notes) -> dict:
    if not os.path.isfile(path):
        notes.append(f"no {path} (the run did not finish)")
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, ValueError) as error:
        notes.append(f"{path} is unreadable ({type(error).__name__}); ignored")
        return {}
    return summary if isinstance(summary, dict) else {}


def _read_configs(path, notes):
    """(TransformerConfig or None, train config dict) from the checkpoint's metadata."""
    if not os.path.isfile(path):
        notes.append(f"no {path}: model and memory checks skipped")
        return None, {}
    try:
        meta = read_checkpoint_meta(path)
        config = TransformerConfig.from_dict(meta.get("model_config", {}))
    except (CheckpointError, TypeError, ValueError) as error:
        notes.append(f"cannot read the model config: {error}")
        return None, {}
    train = meta.get("train_config")
    return config, (train if isinstance(train, dict) else {})


def _key_numbers(rows, summary) -> dict:
    numbers = {}
    if rows:
        last = rows[-1]
        numbers["last_step"] = last["step"]
        for name in ("train_loss", "val_loss"):
            if _finite(last.get(name)):
                numbers[name] = round(last[name], 4)
        vals = [(row["val_loss"], row["step"]) for row in rows if _finite(row.get("val_loss"))]
        if vals:
            best, step = min(vals)
            numbers.update(best_val_loss=round(best, 4), best_step=step)
        loads = [max(c) * len(c) / sum(c) for c in last.get("tokens_per_expert") or [] if c and sum(c) > 0]
        if loads:
            numbers["max_over_mean_load"] = round(max(loads), 3)
        dropped = [x for x in last.get("dropped_fraction") or [] if _finite(x)]
        if dropped:
            numbers["dropped_fraction"] = round(max(dropped), 4)
        ranks = rank_imbalance(rows)
        if ranks is not None:
            numbers["max_over_mean_rows_received"] = round(max(ratio for _, ratio, _ in ranks[1]), 3)
    if _finite(summary.get("improvement_over_unigram")):
        numbers["improvement_over_unigram"] = round(summary["improvement_over_unigram"], 4)
    return numbers


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
