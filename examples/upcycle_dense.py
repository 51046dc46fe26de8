"""Sparse upcycling (Komatsuzaki et al. 2022): continue a trained dense model as an MoE instead of as itself.

1. Train a dense character-level MoETransformer (every feed-forward block a SwiGLU of width 96).
2. Copy it twice. Continue one copy as it is; upcycle the other with tinymoe.models.upcycle: each dense
   block becomes 4 experts, all copies of the block, with top_k=1. Both branches then compute the same
   active FLOPs per token (one SwiGLU of width 96 per layer, plus the router's d·E products), while the
   upcycled one holds 4× the feed-forward parameters. At its first step the upcycled model computes the dense
   model's logits (its combine weight is 1 over identical experts), so it starts from the dense loss.
3. Train both for the same steps with the same data and a fresh AdamW each; print the validation losses.

A run (2-core CPU shared with other jobs: 92 s; expect well under a minute on an idle one): both branches
start at 1.087 nats/char; after 250 more steps the dense model reaches 0.742, the upcycled one 0.718.

    python examples/upcycle_dense.py      # prints both losses, writes runs/examples/upcycle_dense.png
"""
import os
import time

import numpy as np

import tinymoe as tm
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.models.upcycle import upcycle
from tinymoe.optim import AdamW, WarmupCosine, clip_grad_norm
from tinymoe.train.corpus import generate_corpus
from tinymoe.train.data import CharData

dense_steps, continued_steps, batch_size, seq_len, every = 250, 250, 16, 48, 25
data = CharData.from_text(generate_corpus(200_000), seq_len)
# moe_layers=[]: every block dense, of width moe.d_ff · moe.top_k = 96
config = TransformerConfig(vocab_size=len(data.vocab), d_model=48, n_layers=2, n_heads=4, max_seq_len=seq_len,
                           moe=dict(d_ff=96, n_experts=4, top_k=1), moe_layers=[])
validation = [data.batch(np.random.default_rng(100 + i), "val", batch_size, seq_len) for i in range(4)]


def validation_loss(model):
    with tm.no_grad():
        model.eval()
        value = float(np.mean([model.loss(x, y)[1]["cross_entropy"] for x, y in validation]))
        model.train()
    return value


def train(model, steps, lr, seed):
    """AdamW with warm-up + cosine; returns the validation loss every `every` steps."""
    optimizer = AdamW(model.parameters(), lr=lr)
    schedule = WarmupCosine(optimizer, warmup_steps=10, total_steps=steps, min_lr=lr / 10)
    batches = np.random.default_rng(seed)  # the same data order for both branches
    curve = []
    for step in range(1, steps + 1):
        inputs, targets = data.batch(batches, "train", batch_size, seq_len)
        loss, _ = model.loss(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % every == 0:
            curve.append(validation_loss(model))
    return curve


def active_feed_forward_parameters(model):
    """Feed-forward weights one token uses: the dense block, or top_k experts plus the router."""
    total = 0
    for block in model.blocks:
        ffn = block.ffn
        if block.is_moe:
            per_expert = sum(p.size for n, p in ffn.experts.named_parameters()) // ffn.n_experts
            total += ffn.top_k * per_expert + ffn.router.weight.size
        else:
            total += ffn.num_parameters()
    return total


def feed_forward_parameters(model):
    return sum(p.size for name, p in model.named_parameters() if ".ffn." in name)


started = time.perf_counter()
dense = MoETransformer(config, seed=0)
pretraining = train(dense, dense_steps, lr=3e-3, seed=1)
print(f"dense pre-training: {dense_steps} steps, validation loss {pretraining[-1]:.4f}")

branches = {}
for name in ("dense, continued", "upcycled: 4 experts, top-1"):
    model = MoETransformer(config, seed=0)
    model.load_state_dict(dense.state_dict())
    if name.startswith("upcycled"):
        upcycle(model, n_experts=4, top_k=1, generator=np.random.default_rng(7))
    start = validation_loss(model)
    branches[name] = [start] + train(model, continued_steps, lr=1e-3, seed=2)
    print(f"{name:28s} feed-forward parameters {feed_forward_parameters(model):7,d} (active per token "
          f"{active_feed_forward_parameters(model):6,d})   validation loss {start:.4f} at the branch, "
          f"{branches[name][-1]:.4f} after {continued_steps} more steps")
print(f"unigram baseline {data.unigram_loss():.4f}; {time.perf_counter() - started:.0f} s in all")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed; skipping the plot")
else:
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(range(every, dense_steps + 1, every), pretraining, marker="o", color="gray", label="dense pre-training")
    for name, curve in branches.items():
        axes.plot(range(dense_steps, dense_steps + continued_steps + 1, every), curve, marker="o", label=name)
    axes.axvline(dense_steps, color="gray", linestyle=":")
    axes.set_xlabel("step")
    axes.set_ylabel("validation loss (nats/char)")
    axes.set_title("sparse upcycling at equal active FLOPs per token")
    axes.set_ylim(top=min(3.0, max(pretraining)))
    axes.legend()
    figure.tight_layout()
    os.makedirs("runs/examples", exist_ok=True)
    figure.savefig("runs/examples/upcycle_dense.png", dpi=110)
    print("wrote runs/examples/upcycle_dense.png")
