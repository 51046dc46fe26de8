"""Sparse MoE against a dense feed-forward block with the same active parameters per token.

Both language models have the same attention layers. The dense one has one SwiGLU block of width
top_k · d_ff per layer. The sparse one has n_experts SwiGLU experts of width d_ff, of which top_k are
used per token: the same FLOPs per token, n_experts / top_k times the feed-forward parameters.
Early on the two are level (each expert sees only part of the tokens); by step 500 the sparse model is
ahead (on a 2-core CPU, in about 25 s: validation 0.62 nats/char against the dense model's 0.65).

    python examples/sparse_vs_dense.py        # prints both losses, writes runs/examples/sparse_vs_dense.png
"""
import os

import numpy as np

import tinymoe as tm
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.optim import AdamW, WarmupCosine, clip_grad_norm
from tinymoe.train.corpus import generate_corpus
from tinymoe.train.data import CharData

steps, batch_size, seq_len = 500, 16, 48
data = CharData.from_text(generate_corpus(200_000), seq_len)
common = dict(vocab_size=len(data.vocab), d_model=48, n_layers=2, n_heads=4, max_seq_len=seq_len,
              moe=dict(d_ff=96, n_experts=4, top_k=2))
models = {
    "dense (SwiGLU, width 2·96)": TransformerConfig(**common, moe_layers=[]),
    "sparse (4 experts of 96, top-2)": TransformerConfig(**common),
}


def feed_forward_parameters(model):
    return sum(p.size for name, p in model.named_parameters() if ".ffn." in name and "router" not in name)


def train(config):
    """AdamW with warm-up + cosine; returns the validation loss every 20 steps."""
    model = MoETransformer(config, seed=0)
    optimizer = AdamW(model.parameters(), lr=3e-3)
    schedule = WarmupCosine(optimizer, warmup_steps=10, total_steps=steps, min_lr=3e-4)
    batches = np.random.default_rng(1)                       # same data order for both models
    validation = [data.batch(np.random.default_rng(2 + i), "val", batch_size, seq_len) for i in range(4)]
    curve = []
    for step in range(1, steps + 1):
        inputs, targets = data.batch(batches, "train", batch_size, seq_len)
        loss, _ = model.loss(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            with tm.no_grad():
                model.eval()
                curve.append(np.mean([model.loss(x, y)[1]["cross_entropy"] for x, y in validation]))
                model.train()
    return model, curve


results = {}
for name, config in models.items():
    model, curve = train(config)
    results[name] = curve
    print(f"{name:34s} feed-forward parameters {feed_forward_parameters(model):7,d}   "
          f"validation loss {curve[-1]:.3f} (unigram baseline {data.unigram_loss():.3f})")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed; skipping the plot")
else:
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, curve in results.items():
        axes.plot(range(20, steps + 1, 20), curve, marker="o", label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("validation loss (nats/char)")
    axes.set_title("same active parameters per token: dense vs sparse")
    axes.legend()
    figure.tight_layout()
    os.makedirs("runs/examples", exist_ok=True)
    figure.savefig("runs/examples/sparse_vs_dense.png", dpi=110)
    print("wrote runs/examples/sparse_vs_dense.png")
