"""PNG plots of a training run (needs matplotlib; `plot_run` returns [] without it)."""
from __future__ import annotations

import os

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_run(metrics: list, summary: dict, out_dir) -> list:
    """Write loss.png (train/val loss and the unigram baseline) and expert_load.png (tokens per expert per
    layer over training, as fractions). Returns the paths written."""
    plt = _pyplot()
    if plt is None or not metrics:
        return []
    written = []
    steps = [row["step"] for row in metrics]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, [row["train_loss"] for row in metrics], label="train")
    axes.plot(steps, [row["val_loss"] for row in metrics], label="validation")
    losses = [row[key] for row in metrics for key in ("train_loss", "val_loss")]
    top = max(losses)
    if summary.get("unigram_loss") is not None:
        unigram = summary["unigram_loss"]
        axes.axhline(unigram, color="grey", linestyle="--", label="unigram baseline")
        axes.annotate(f"unigram baseline {unigram:.2f}", (steps[-1], unigram), xytext=(0, 4),
                      textcoords="offset points", ha="right", va="bottom", color="grey", fontsize=8)
        top = max(top, unigram)
    bottom = min(losses)
    margin = 0.08 * max(top - bottom, 1e-3)
    axes.set_ylim(max(0.0, bottom - margin), top + 2 * margin)  # the baseline and its label inside the frame
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/char)")
    axes.set_title("tinymoe training loss")
    axes.legend()
    figure.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    loads = [row.get("tokens_per_expert") or [] for row in metrics]
    n_layers = len(loads[-1])
    if n_layers:
        figure, axes = plt.subplots(n_layers, 1, figsize=(7, 1.2 + 1.6 * n_layers), squeeze=False)
        for layer in range(n_layers):
            counts = np.array([row[layer] for row in loads], dtype=np.float64).T  # (E, evals)
            fractions = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)
            first, last = (steps[0], steps[-1]) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)
            image = axes[layer, 0].imshow(fractions, aspect="auto", cmap="viridis", vmin=0,
                                          extent=(first, last, counts.shape[0] - 0.5, -0.5))
            axes[layer, 0].set_ylabel(f"MoE layer {layer}\nexpert")
            figure.colorbar(image, ax=axes[layer, 0], label="share of tokens")
        axes[-1, 0].set_xlabel("step")
        figure.suptitle("expert load over training")
        figure.tight_layout()
        path = os.path.join(out_dir, "expert_load.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
