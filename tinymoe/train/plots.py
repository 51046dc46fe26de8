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
    """Write loss.png (train/val loss and the unigram baseline), expert_load.png (tokens per expert per
    layer over training, as fractions) and, when the router gives tokens a varying number of experts,
    experts_per_token.png (see plot_experts_per_token). Returns the paths written."""
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
    path = plot_experts_per_token(plt, metrics, out_dir)
    return written + ([path] if path else [])


def experts_vary(metrics: list) -> bool:
    """True when some row's experts-per-token histogram has tokens outside its top bin (top_p, relu, expert
    choice, null experts); False for plain top-k routing (every token k experts) and rows without histograms."""
    return any(sum(histogram[:-1]) > 0 for row in metrics for histogram in row.get("experts_per_token_histogram")
               or () if histogram)


def plot_experts_per_token(plt, metrics: list, out_dir):
    """experts_per_token.png: the mean experts per token of every MoE layer over training (top) and the last
    evaluation window's histogram per layer (bottom). Written only when experts_vary(metrics); returns its path
    or None."""
    if not experts_vary(metrics):
        return None
    rows = [row for row in metrics if row.get("experts_per_token")]
    steps = [row["step"] for row in rows]
    figure, (means, bars) = plt.subplots(2, 1, figsize=(7, 6))
    n_layers = len(rows[-1]["experts_per_token"])
    for layer in range(n_layers):
        means.plot(steps, [row["experts_per_token"][layer] for row in rows], marker=".", label=f"MoE layer {layer}")
    means.set_xlabel("step")
    means.set_ylabel("experts per token (mean)")
    means.legend(fontsize=8)
    width = 0.8 / max(n_layers, 1)
    for layer, histogram in enumerate(rows[-1]["experts_per_token_histogram"]):
        counts = np.asarray(histogram, dtype=np.float64)
        bars.bar(np.arange(counts.size) + layer * width, counts / max(counts.sum(), 1.0), width=width,
                 label=f"MoE layer {layer}")
    bars.set_xlabel(f"experts chosen by a token (window ending at step {steps[-1]})")
    bars.set_ylabel("share of tokens")
    bars.legend(fontsize=8)
    figure.suptitle("experts per token")
    figure.tight_layout()
    path = os.path.join(out_dir, "experts_per_token.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
