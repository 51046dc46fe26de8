"""Fine-tuning a loaded transformers-format model (`tinymoe.models.from_pretrained`) on a token stream: the
loop behind `tinymoe train --from-pretrained DIR --data FILE`.

It reuses the pieces of the Trainer (train/loop.py) that do not depend on MoETransformer: AdamW with decay on
matrices only, warm-up + cosine (WarmupCosine), global-norm clipping, gradient accumulation (accumulation.py),
the progress line and the metrics log. The loss of a batch of windows x, y = tokens[s:s+L], tokens[s+1:s+L+1]:

    loss = cross_entropy(model(x), y) + aux_coef · mean over MoE layers of aux_loss     (aux 1.0 = balanced)

At the end the model is written with save_pretrained (config.json + model.safetensors) to out_dir, which
`from_pretrained(out_dir)` loads back, with metrics.jsonl (one row per evaluation) and summary.json. An out_dir
that already holds a model or a run (RUN_FILES) is refused unless overwrite=True, as `tinymoe train` refuses one
without --overwrite: re-running a command never destroys a run.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .. import functional as F
from ..engine.autograd import no_grad
from ..engine.checks import require_bool
from ..io.atomic import atomic_write
from ..io.safetensors_reader import INDEX_NAME
from ..optim import AdamW, WarmupCosine, clip_grad_norm
from .accumulation import accumulate_gradients, mean_over_micro_batches, split_micro_batches
from .data import DataError
from .metrics_log import METRICS_NAME, append_metrics
from .progress import Progress
from .train_config import TrainConfig

VAL_FRACTION = 0.1  # the last tenth of the tokens is held out for the validation loss
SUMMARY_NAME = "summary.json"
# Files of an earlier model or run in out_dir: any of them makes out_dir taken (overwrite=True replaces them;
# a stale checkpoint.npz or shard index would otherwise sit beside, or shadow, the new model.safetensors).
RUN_FILES = ("model.safetensors", INDEX_NAME, "checkpoint.npz", METRICS_NAME, SUMMARY_NAME)


def existing_run_file(out_dir):
    """The first of RUN_FILES that `out_dir` holds, or None (also when out_dir does not exist)."""
    return next((name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))), None)


def split_tokens(tokens, seq_len: int, val_fraction: float = VAL_FRACTION):
    """(train, val) int64 arrays; DataError when either is too short for one window of seq_len + 1 tokens."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    split = int(len(tokens) * (1 - val_fraction))
    train, val = tokens[:split], tokens[split:]
    if len(train) <= seq_len or len(val) <= seq_len:
        raise DataError(f"the text gives {len(tokens)} tokens: too few for sequences of {seq_len} (need more than "
                        f"{math.ceil((seq_len + 1) / val_fraction)}; give a smaller --seq-len or more text)")
    return train, val


def windows(tokens, generator, batch_size: int, seq_len: int):
    """(inputs, targets) (batch_size, seq_len): random windows of `tokens` and the same shifted by one."""
    starts = generator.integers(0, len(tokens) - seq_len, size=batch_size)
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)]
    return rows[:, :-1], rows[:, 1:]


def lm_loss(model, inputs, targets, aux_coef: float):
    """(total loss Tensor, cross-entropy float, mean aux float) of a causal LM (logits (B, L, V)) on a batch."""
    logits = model(inputs)
    xp = logits.xp
    cross_entropy = F.cross_entropy(logits.reshape(-1, model.vocab_size), xp.asarray(targets).reshape(-1))
    layers = model.moe_layers()
    aux = sum(layer.aux_loss for layer in layers) * (1.0 / len(layers)) if layers else None
    total = cross_entropy + aux_coef * aux if aux is not None and aux_coef else cross_entropy
    return total, float(cross_entropy.numpy()), float(aux.numpy()) if aux is not None else 0.0


def finetune(model, tokens, config: TrainConfig, out_dir, aux_coef: float = 0.01, stream=None, *,
             overwrite: bool = False) -> dict:
    """Train `model` (an HFCausalLM) on `tokens` (ints) for config.steps optimizer steps of
    config.batch_size × config.grad_accum windows of config.seq_len tokens, then save it to out_dir.
    Returns the summary (also written to out_dir/summary.json): first and last train loss, val_loss, steps.
    FileExistsError, before any work, when out_dir holds one of RUN_FILES and overwrite is False; with
    overwrite=True they are removed first (so an interrupted run leaves no stale log, summary or index), except
    model.safetensors, which save_pretrained replaces at the end (a diverged run leaves the old model whole)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"finetune: config must be a TrainConfig, got {type(config).__name__}")
    overwrite = require_bool(overwrite, "overwrite", "finetune")
    out_dir = os.fspath(out_dir)
    existing = existing_run_file(out_dir)
    if existing is not None and not overwrite:
        raise FileExistsError(f"finetune: {out_dir} already holds {existing} (a model or run written before); "
                              "pass overwrite=True to replace it, or choose another out_dir")
    train, val = split_tokens(tokens, config.seq_len)
    if int(max(train.max(), val.max())) >= model.vocab_size:
        raise DataError(f"the tokenizer gives ids up to {int(max(train.max(), val.max()))} but the model has "
                        f"vocab_size={model.vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    for name in RUN_FILES if overwrite else ():
        if name != "model.safetensors" and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    metrics_path = os.path.join(out_dir, METRICS_NAME)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                      weight_decay=config.weight_decay)
    schedule = WarmupCosine(optimizer, config.warmup_steps, config.steps, config.min_lr)
    batches, validation = np.random.default_rng(config.seed + 1), np.random.default_rng(config.seed + 2)
    step_batch = config.batch_size * config.grad_accum
    val_batches = [windows(val, validation, step_batch, config.seq_len) for _ in range(config.eval_batches)]
    progress = Progress(config.steps, stream)
    losses, seconds, rows = [], 0.0, []
    model.train()
    for step in range(1, config.steps + 1):
        started = time.perf_counter()
        inputs, targets = windows(train, batches, step_batch, config.seq_len)
        optimizer.zero_grad()
        results = accumulate_gradients(model, lambda batch: lm_loss(model, *batch, aux_coef),
                                       split_micro_batches((inputs, targets), config.grad_accum))
        cross_entropy = mean_over_micro_batches(result[1] for result in results)
        aux = mean_over_micro_batches(result[2] for result in results)
        if not math.isfinite(cross_entropy):
            raise FloatingPointError(f"fine-tuning diverged: the loss became {cross_entropy} at step {step}; "
                                     f"nothing was saved; try a lower --lr (this run: {config.lr:g})")
        clip_grad_norm(optimizer.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        elapsed = time.perf_counter() - started
        seconds += elapsed
        losses.append(cross_entropy)
        progress.update(step, cross_entropy, aux, inputs.size / max(elapsed, 1e-9))
        if step % config.eval_every == 0 or step == config.steps:
            row = {"step": step, "train_loss": cross_entropy, "val_loss": validation_loss(model, val_batches,
                                                                                          config.grad_accum),
                   "aux_loss": aux, "lr": optimizer.lr}
            append_metrics(metrics_path, row)
            rows.append(row)
            progress.message(f"eval at step {step}: val_loss {row['val_loss']:.4f}")
    model.eval()
    model.save_pretrained(out_dir)
    summary = {"first_train_loss": losses[0], "train_loss": losses[-1], "val_loss": rows[-1]["val_loss"],
               "steps": config.steps, "seconds": seconds, "device": config.device,
               "parameters": model.num_parameters(), "tokens": int(len(train) + len(val))}
    with atomic_write(os.path.join(out_dir, SUMMARY_NAME), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def validation_loss(model, val_batches, n_micro_batches: int) -> float:
    """Mean cross-entropy over the validation batches, in eval mode, each in n equal micro-batches."""
    model.eval()
    try:
        with no_grad():
            return float(np.mean([mean_over_micro_batches(lm_loss(model, *micro, 0.0)[1]
                                                          for micro in split_micro_batches(batch, n_micro_batches))
                                  for batch in val_batches]))
    finally:
        model.train()
