"""The training loop behind `tinymoe train`: batches, AdamW with warm-up + cosine, evaluation, metrics,
checkpoints, resume, plots.

Files written to the output directory:
    checkpoint.npz  weights, optimizer, configs, step, RNG states (written at every evaluation)
    metrics.jsonl   one JSON object per evaluation
    summary.json    final val_loss, unigram_loss, steps, seconds, device, ...
    loss.png, expert_load.png   when matplotlib is installed
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..engine.autograd import no_grad
from ..engine.backend import normalize_device
from ..io.atomic import atomic_write
from ..models import MoETransformer, TransformerConfig
from ..optim import AdamW, WarmupCosine, clip_grad_norm
from .checkpoint import (check_same_config, generator_states, load_checkpoint, restore_generator_states,
                         save_checkpoint)
from .data import CharData
from .plots import plot_run
from .progress import Progress

CHECKPOINT_NAME = "checkpoint.npz"


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr (got lr={self.lr}, min_lr={self.min_lr})")
        for name, value, ok in (("warmup_steps", self.warmup_steps, self.warmup_steps >= 0),
                                ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                                ("grad_clip", self.grad_clip, self.grad_clip > 0)):
            if not ok:
                raise ValueError(f"{name}={value!r} must be {'> 0' if name == 'grad_clip' else '>= 0'}")
        self.device = normalize_device(self.device)


class Trainer:
    def __init__(self, model_config: TransformerConfig, train_config: TrainConfig, data: CharData, out_dir,
                 stream=None):
        self.model_config, self.config, self.data, self.out_dir = model_config, train_config, data, out_dir
        self.stream = stream
        if model_config.vocab_size != len(data.vocab):
            raise ValueError(f"model vocab_size={model_config.vocab_size} but the data has {len(data.vocab)} symbols")
        if train_config.seq_len > model_config.max_seq_len:
            raise ValueError(f"seq_len={train_config.seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}")
        self.model = MoETransformer(model_config, device=train_config.device, seed=train_config.seed)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                               lr=train_config.lr, weight_decay=train_config.weight_decay)
        self.schedule = WarmupCosine(self.optimizer, train_config.warmup_steps, train_config.steps, train_config.min_lr)
        self.batch_generator = np.random.default_rng(train_config.seed + 1)
        validation_generator = np.random.default_rng(train_config.seed + 2)
        self.val_batches = [data.batch(validation_generator, "val", train_config.batch_size, train_config.seq_len)
                            for _ in range(train_config.eval_batches)]
        self.step, self.seconds, self.metrics = 0, 0.0, []

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, CHECKPOINT_NAME)

    # ----- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        meta = {
            "model_config": self.model_config.to_dict(), "train_config": asdict(self.config), "step": self.step,
            "seconds": self.seconds, "vocab": self.data.vocab, "schedule": self.schedule.state_dict(),
            "generators": generator_states(self.model),
            "batch_generator": self.batch_generator.bit_generator.state,
        }
        save_checkpoint(self.checkpoint_path, self.model.state_dict(), self.optimizer.state_dict(), meta)

    def resume(self) -> None:
        """Continue from the checkpoint in out_dir: weights, optimizer, schedule, step, RNG states, metrics."""
        checkpoint = load_checkpoint(self.checkpoint_path)
        checkpoint.meta["model_config"] = _current_form(checkpoint.meta.get("model_config", {}))
        check_same_config(checkpoint, self.model_config.to_dict(), self.checkpoint_path)
        meta = checkpoint.meta
        if meta["vocab"] != self.data.vocab:
            raise ValueError(f"{self.checkpoint_path} was trained on another vocabulary; use the same --data")
        self.model.load_state_dict(checkpoint.model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.schedule.load_state_dict(meta["schedule"])
        restore_generator_states(self.model, meta["generators"])
        self.batch_generator.bit_generator.state = meta["batch_generator"]
        self.step, self.seconds = int(meta["step"]), float(meta["seconds"])
        self.metrics = [row for row in _read_metrics(self.out_dir) if row["step"] <= self.step]
        with atomic_write(os.path.join(self.out_dir, "metrics.jsonl"), "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in self.metrics)  # drop rows past the checkpoint

    # ----- the loop ----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        self.model.eval()
        with no_grad():
            losses = [self.model.loss(x, y)[1]["cross_entropy"] for x, y in self.val_batches]
        self.model.train()
        return float(np.mean(losses))

    def run(self) -> dict:
        config, model = self.config, self.model
        progress = Progress(config.steps, self.stream, start_step=self.step)
        window = {"loss": [], "aux": [], "z": [], "tokens": 0, "seconds": 0.0}
        layer_counts = [np.zeros(layer.n_experts, dtype=np.int64) for layer in model.moe_layers()]
        layer_dropped = [[] for _ in layer_counts]
        model.train()
        while self.step < config.steps:
            started = time.perf_counter()
            inputs, targets = self.data.batch(self.batch_generator, "train", config.batch_size, config.seq_len)
            total, parts = model.loss(inputs, targets)
            if not math.isfinite(parts["total"]):
                raise FloatingPointError(f"the loss became {parts['total']} at step {self.step + 1}; "
                                         "lower --lr or raise --grad-clip")
            self.optimizer.zero_grad()
            total.backward()
            clip_grad_norm(self.optimizer.parameters(), config.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
            elapsed = time.perf_counter() - started
            self.seconds += elapsed
            for index, layer in enumerate(model.moe_layers()):  # host values of the plan: no device sync
                layer_counts[index] += layer.stats.kept_per_expert
                layer_dropped[index].append(layer.stats.dropped_fraction)
            window["loss"].append(parts["cross_entropy"])
            window["aux"].append(parts["aux"])
            window["z"].append(parts["z"])
            window["tokens"] += inputs.size
            window["seconds"] += elapsed
            tokens_per_second = inputs.size / elapsed
            progress.update(self.step, parts["cross_entropy"], parts["aux"], tokens_per_second)
            if self.step % config.eval_every == 0 or self.step == config.steps:
                row = {
                    "step": self.step, "train_loss": float(np.mean(window["loss"])), "val_loss": self.evaluate(),
                    "aux_loss": float(np.mean(window["aux"])), "z_loss": float(np.mean(window["z"])),
                    "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
                    "tokens_per_expert": [counts.tolist() for counts in layer_counts],
                    "dropped_fraction": [float(np.mean(d)) if d else 0.0 for d in layer_dropped],
                    "lr": self.optimizer.lr,
                }
                self.metrics.append(row)
                _append_metrics(self.out_dir, row)
                self.save()
                progress.message(f"eval at step {self.step}: val_loss {row['val_loss']:.4f}")
                window = {"loss": [], "aux": [], "z": [], "tokens": 0, "seconds": 0.0}
                layer_counts = [np.zeros_like(counts) for counts in layer_counts]
                layer_dropped = [[] for _ in layer_dropped]
        return self.finish()

    def finish(self) -> dict:
        final = self.metrics[-1] if self.metrics else {"val_loss": self.evaluate()}
        summary = {
            "val_loss": final["val_loss"], "unigram_loss": self.data.unigram_loss(), "steps": self.step,
            "seconds": self.seconds, "device": self.config.device,
            "tokens_per_second": self.step * self.config.batch_size * self.config.seq_len / max(self.seconds, 1e-9),
            "parameters": self.model.num_parameters(), "vocab_size": len(self.data.vocab),
        }
        summary["improvement_over_unigram"] = 1.0 - summary["val_loss"] / summary["unigram_loss"]
        summary["plots"] = [os.path.basename(path) for path in plot_run(self.metrics, summary, self.out_dir)]
        with atomic_write(os.path.join(self.out_dir, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        return summary


def _current_form(model_config: dict) -> dict:
    """A saved model config (nested, or the flat form of earlier releases) as to_dict writes it today."""
    try:
        return TransformerConfig.from_dict(model_config).to_dict()
    except (TypeError, ValueError):
        return model_config  # check_same_config reports how it differs


def _append_metrics(out_dir, row) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _read_metrics(out_dir) -> list:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
