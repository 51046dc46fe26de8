"""The training loop behind `tinymoe train`: batches, AdamW with warm-up + cosine, evaluation, metrics,
checkpoints, resume, plots.

Files written to the output directory:
    checkpoint.npz  weights, optimizer, configs, step, RNG states and the open metrics window; written at every
                    evaluation, every `checkpoint_every` steps (None: when `checkpoint_seconds` have passed since
                    the last save, checked between steps), and when the run is interrupted (Ctrl-C)
    metrics.jsonl   one JSON object per evaluation
    summary.json    final val_loss, unigram_loss, steps, seconds, device, ...
    loss.png, expert_load.png   when matplotlib is installed (and experts_per_token.png when that count varies)

A checkpoint is only ever written between two steps, with finite weights: an interrupted run, a diverged run
and a full disk all leave the last good checkpoint in place.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np

from .. import kernels
from ..engine.autograd import no_grad
from ..io.atomic import atomic_write
from ..models import MoETransformer, TransformerConfig
from ..optim import AdamW, WarmupCosine, clip_grad_norm
from .checkpoint import (RESUME_KEYS, CheckpointError, check_same_config, generator_states, load_checkpoint,
                         remove_stale_temporaries, restore_training_state, save_checkpoint)
from .data import CharData
from .distributed import ParallelTraining
from .interrupt import DeferredInterrupt, TrainingInterrupted
from .micro_batches import accumulated_step, micro_batched_loss, moe_counts
from .metrics_log import METRICS_NAME, append_metrics, read_metrics, rewrite_metrics
from .plots import plot_run
from .progress import Progress
from .train_config import MAY_CHANGE_ON_RESUME, TrainConfig, train_config_differences  # noqa: F401
from .window_stats import (adaptive_compute, add_layer_counts, empty_window, row_fields, step_experts_per_token,
                           window_from_meta, window_meta)

CHECKPOINT_NAME = "checkpoint.npz"
class DivergenceError(FloatingPointError):
    """The loss or the weights became NaN or infinite; the last good checkpoint was kept."""


class OutputError(OSError):
    """A file of the run could not be written (disk full, read-only directory); the message names it (errno
    and filename are those of the OSError behind it)."""

    def __str__(self):
        return self.message


class Trainer:
    def __init__(self, model_config: TransformerConfig, train_config: TrainConfig, data: CharData, out_dir,
                 stream=None, warning_stream=None, comm=None):
        """comm: a tinymoe.distributed Communicator of P > 1 ranks for expert + data parallelism (every rank
        builds the same Trainer; rank 0 prints and writes the files), or None for one process."""
        self.model_config, self.config, self.data, self.out_dir = model_config, train_config, data, out_dir
        self.stream, self.warning_stream = stream, warning_stream
        if model_config.vocab_size != len(data.vocab):
            raise ValueError(f"model vocab_size={model_config.vocab_size} but the data has {len(data.vocab)} symbols")
        if train_config.seq_len > model_config.max_seq_len:
            raise ValueError(f"seq_len={train_config.seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}")
        self.model = MoETransformer(model_config, device=train_config.device, seed=train_config.seed)
        self.parallel = (None if comm is None or comm.size == 1 else
                         ParallelTraining(comm, train_config.batch_size, train_config.grad_accum))
        if self.parallel:  # before the optimizer: the expert parameters become this rank's slices
            self.parallel.prepare(self.model)
        self.is_main = self.parallel is None or self.parallel.is_main
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                               lr=train_config.lr, weight_decay=train_config.weight_decay)
        self.schedule = WarmupCosine(self.optimizer, train_config.warmup_steps, train_config.steps, train_config.min_lr)
        self.batch_generator = np.random.default_rng(train_config.seed + 1)
        validation_generator = np.random.default_rng(train_config.seed + 2)
        self.val_batches = [data.batch(validation_generator, "val", train_config.batch_size * train_config.grad_accum,
                                       train_config.seq_len)
                            for _ in range(train_config.eval_batches)]
        self.step, self.seconds, self.metrics = 0, 0.0, []
        self.window = empty_window(self.model)
        self.saved_step, self._last_save = None, time.monotonic()  # the step checkpoint.npz holds (None: none)

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, CHECKPOINT_NAME)

    @property
    def metrics_path(self):
        return os.path.join(self.out_dir, METRICS_NAME)

    def _warn(self, text: str) -> None:
        stream = self.warning_stream or sys.stderr
        stream.write(f"warning: {text}\n")
        stream.flush()

    # ----- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        """Write checkpoint.npz atomically; DivergenceError (nothing written) if a weight is not finite,
        OutputError naming the file if it cannot be written (the previous checkpoint stays)."""
        model_state, optimizer_state = ((self.model.state_dict(), self.optimizer.state_dict()) if not self.parallel
                                        else self.parallel.checkpoint_state(self.model, self.optimizer))
        broken = [name for name, value in model_state.items()
                  if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all()]
        if broken:
            raise self._diverged(f"the weights became non-finite ({', '.join(broken[:3])}) at step {self.step}")
        meta = {
            "model_config": self.model_config.to_dict(), "train_config": asdict(self.config), "step": self.step,
            "seconds": self.seconds, "vocab": self.data.vocab, "schedule": self.schedule.state_dict(),
            "generators": generator_states(self.model),
            "batch_generator": self.batch_generator.bit_generator.state,
            "window": window_meta(self.window),
        }
        try:
            if self.is_main:
                save_checkpoint(self.checkpoint_path, model_state, optimizer_state, meta)
        except OSError as error:
            raise self._output_error(self.checkpoint_path, error) from None
        self.saved_step, self._last_save = self.step, time.monotonic()

    def resume(self) -> None:
        """Continue from the checkpoint in out_dir: weights, optimizer, schedule, step, RNG states, metrics.

        CheckpointError when the checkpoint is missing or damaged, or was made with another model config,
        another vocabulary or other training settings (all but MAY_CHANGE_ON_RESUME must match)."""
        path = self.checkpoint_path
        checkpoint = load_checkpoint(path, required=RESUME_KEYS)
        meta = checkpoint.meta
        meta["model_config"] = _current_form(meta["model_config"])
        check_same_config(checkpoint, self.model_config.to_dict(), path)
        if meta["vocab"] != self.data.vocab:
            raise CheckpointError(f"{path} was trained on another vocabulary ({len(meta['vocab'])} symbols, this "
                                  f"data has {len(self.data.vocab)}); use the same --data")
        differences = train_config_differences(meta["train_config"], self.config)
        if differences:
            raise CheckpointError(f"{path} was trained with other settings, which cannot change on resume: "
                                  + "; ".join(f"{name}: checkpoint {saved!r} vs given {given!r}"
                                              for name, saved, given in differences))
        window = window_from_meta(meta.get("window"), self.model, path)
        if self.parallel:  # every rank reads the file and keeps its slice of the experts (any P dividing E)
            checkpoint = self.parallel.localize(checkpoint, self.model, self.optimizer)
        restore_training_state(checkpoint, path, self.model, self.optimizer, self.schedule, self.batch_generator)
        self.step, self.seconds, self.window = int(meta["step"]), float(meta["seconds"]), window
        self.saved_step = self.step
        self.metrics = read_metrics(self.metrics_path, up_to_step=self.step, warn=self._warn)
        try:  # drop rows past the checkpoint and a torn last line
            if self.is_main:
                rewrite_metrics(self.metrics_path, self.metrics)
        except OSError as error:
            raise self._output_error(self.metrics_path, error) from None

    def _diverged(self, what: str) -> DivergenceError:
        kept = (f"the last good checkpoint, {self.checkpoint_path} at step {self.saved_step}, is kept"
                if self.saved_step is not None else "no checkpoint was written")
        return DivergenceError(f"training diverged: {what}; {kept}; try a lower --lr (this run: {self.config.lr:g})")

    def _output_error(self, path, error: OSError) -> OutputError:
        kept = (f"the last good checkpoint (step {self.saved_step}) is unchanged" if self.saved_step is not None
                else "no checkpoint was written")
        failure = OutputError(error.errno, error.strerror, path)
        failure.message = f"cannot write {path}: {error.strerror or error}; {kept}"
        return failure

    # ----- the loop ----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        if self.parallel:
            return self.parallel.evaluate(self.model, self.val_batches)
        self.model.eval()
        with no_grad():  # in micro-batches of batch_size: equal sizes, so their mean is the whole batch's
            losses = [micro_batched_loss(self.model, x, y, self.config.grad_accum) for x, y in self.val_batches]
        self.model.train()
        return float(np.mean(losses))

    def run(self) -> dict:
        """Train to config.steps, then finish(). A Ctrl-C is acted on between two steps: the checkpoint is
        saved at the step reached and TrainingInterrupted raised (a second Ctrl-C stops at once, keeping the
        last checkpoint)."""
        config, model = self.config, self.model
        stream = self.stream if not self.parallel else self.parallel.progress_stream(self.stream)
        progress = Progress(config.steps, stream, start_step=self.step)
        for name in (CHECKPOINT_NAME, METRICS_NAME, "summary.json") if self.is_main else ():
            removed = remove_stale_temporaries(self.out_dir, name=name)
            if removed:
                progress.message(f"removed {len(removed)} stale temporary file(s) of an interrupted save: "
                                 + ", ".join(os.path.basename(path) for path in removed))
        global _FIRST_STEP_OF_PROCESS
        if _FIRST_STEP_OF_PROCESS and self.step < config.steps and kernels.chosen(config.device) == "numba":
            progress.message("compiling kernels (first run only)...")
        model.train()
        at_boundary = True  # between two steps: the whole state is that of step `self.step`
        with DeferredInterrupt() as interrupt:
            try:
                while self.step < config.steps:
                    if interrupt.requested if not self.parallel else self.parallel.any(interrupt.requested):
                        raise KeyboardInterrupt  # under MPI every rank stops at the same step
                    at_boundary = False
                    self._train_step(progress)
                    _FIRST_STEP_OF_PROCESS = False
                    evaluated = self.step % config.eval_every == 0 or self.step == config.steps
                    if evaluated:
                        self._evaluate_and_log(progress)
                    elif self._checkpoint_due():  # under MPI, rank 0's clock decides for every rank
                        self.save()
                    at_boundary = True
            except KeyboardInterrupt:
                saved_now = at_boundary and self.step > 0 and self.saved_step != self.step
                if saved_now:
                    self.save()
                raise TrainingInterrupted(self.saved_step or 0, self.checkpoint_path if self.saved_step is not None
                                          else None, saved_now) from None
        return self.finish()

    def _train_step(self, progress) -> None:
        config, model, window, layer_counts = self.config, self.model, self.window, None
        started = time.perf_counter()
        inputs, targets = self.data.batch(self.batch_generator, "train", config.batch_size * config.grad_accum, config.seq_len)
        if self.parallel:  # this rank's share of the batch; gradients reduced; parts averaged over ranks
            try:
                parts = self.parallel.step(model, self.optimizer, inputs, targets, config.grad_clip)
            except FloatingPointError as error:
                raise self._diverged(f"{error} at step {self.step + 1}") from None
        elif config.grad_accum > 1:
            parts, layer_counts = accumulated_step(model, self.optimizer, inputs, targets, config.grad_accum,
                config.grad_clip, lambda loss: self._diverged(f"the loss became {loss} at step {self.step + 1}"))
        else:
            total, parts = model.loss(inputs, targets)
            if not math.isfinite(parts["total"]):
                raise self._diverged(f"the loss became {parts['total']} at step {self.step + 1}")
            self.optimizer.zero_grad()
            total.backward()
            clip_grad_norm(self.optimizer.parameters(), config.grad_clip)
            self.optimizer.step()
            layer_counts = moe_counts(model)  # per MoE layer (kept per expert, dropped, histogram); host values
        self.schedule.step()
        self.step += 1
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        if self.parallel:  # global counts; per-rank rows received, bytes and seconds of the all-to-alls
            layer_counts, exchange = self.parallel.layer_statistics(model)
            self._accumulate_exchange(exchange)
        add_layer_counts(window, layer_counts)
        for key in ("loss", "aux", "z"):
            window[key].append(float(parts["cross_entropy" if key == "loss" else key]))
        window["tokens"] += int(inputs.size)
        window["seconds"] += elapsed
        progress.update(self.step, parts["cross_entropy"], parts["aux"], inputs.size / elapsed,
                        step_experts_per_token(layer_counts) if adaptive_compute(model) else None)

    def _accumulate_exchange(self, exchange: dict) -> None:
        """Sum per layer and rank, over the steps since the last evaluation, what the all-to-alls moved."""
        window = self.window.setdefault("exchange", {})
        for key, per_layer in exchange.items():
            total = window.setdefault(key, [[0] * len(ranks) for ranks in per_layer])
            for layer, ranks in enumerate(per_layer):
                for rank, value in enumerate(ranks):
                    total[layer][rank] += value

    def _evaluate_and_log(self, progress) -> None:
        window = self.window
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            raise self._diverged(f"the validation loss became {val_loss} at step {self.step}")
        row = {
            "step": self.step, "train_loss": float(np.mean(window["loss"])), "val_loss": val_loss,
            "aux_loss": float(np.mean(window["aux"])), "z_loss": float(np.mean(window["z"])),
            "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
            **row_fields(window), "lr": self.optimizer.lr,
        }
        if self.parallel:  # per layer, per rank: rows_received, bytes_sent, bytes_received, exchange_seconds
            row["expert_parallel"] = dict(self.window.get("exchange", {}), ranks=self.parallel.comm.size)
        try:
            if self.is_main:
                append_metrics(self.metrics_path, row)
        except OSError as error:
            raise self._output_error(self.metrics_path, error) from None
        self.metrics.append(row)
        self.window = empty_window(self.model)
        self.save()
        progress.message(f"eval at step {self.step}: val_loss {row['val_loss']:.4f}")

    def _checkpoint_due(self) -> bool:
        every = self.config.checkpoint_every
        if every is None:
            due = time.monotonic() - self._last_save >= self.config.checkpoint_seconds
            return due if not self.parallel else self.parallel.root_decides(due)
        return every > 0 and self.step % every == 0

    def finish(self) -> dict:
        final = self.metrics[-1] if self.metrics else {"val_loss": self.evaluate()}
        summary = {
            "val_loss": final["val_loss"], "unigram_loss": self.data.unigram_loss(), "steps": self.step,
            "seconds": self.seconds, "device": self.config.device,
            "tokens_per_second": self.step * self.config.batch_size * self.config.grad_accum * self.config.seq_len
                                 / max(self.seconds, 1e-9),
            "parameters": self.parallel.num_parameters(self.model) if self.parallel else self.model.num_parameters(),
            "vocab_size": len(self.data.vocab),
        }
        summary["improvement_over_unigram"] = 1.0 - summary["val_loss"] / summary["unigram_loss"]
        if not self.is_main:  # rank 0 plots and writes the summary
            summary["plots"] = []
            return summary
        summary["plots"] = [os.path.basename(path) for path in plot_run(self.metrics, summary, self.out_dir)]
        path = os.path.join(self.out_dir, "summary.json")
        try:
            with atomic_write(path, "w") as handle:
                json.dump(summary, handle, indent=2)
        except OSError as error:
            raise self._output_error(path, error) from None
        return summary


_FIRST_STEP_OF_PROCESS = True  # the Numba kernels compile (or load from their cache) at the first step


def _current_form(model_config: dict) -> dict:
    """A saved model config (nested, or the flat form of earlier releases) as to_dict writes it today."""
    try:
        return TransformerConfig.from_dict(model_config).to_dict()
    except (TypeError, ValueError):
        return model_config  # check_same_config reports how it differs
