"""Routing strategies side by side: load balance, dropped tokens and loss on the same data.

Five one-layer MoE language models, identical but for the router:
    softmax, no aux loss      top-2 of softmax, nothing keeps the load even (the classic failure)
    softmax + aux loss        the Switch load-balance loss (aux_coef 0.01)
    noisy top-k               Shazeer et al. 2017: noise in training + importance and load losses
    sigmoid + aux-free bias   DeepSeek-V3: a per-expert bias nudged toward balance after every step
    expert choice             Zhou et al. 2022: each expert picks its tokens, balanced by construction
Token-choice routers run with capacity factor 1.0, so an overloaded expert drops tokens: routing
imbalance becomes lost work you can see.

    python examples/routing_strategies.py      # prints a table, writes runs/examples/routing_strategies.png
"""
import os

import numpy as np

import tinymoe as tm
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.optim import AdamW, clip_grad_norm
from tinymoe.train.corpus import generate_corpus
from tinymoe.train.data import CharData

steps, batch_size, seq_len, n_experts = 80, 12, 48, 8
data = CharData.from_text(generate_corpus(200_000), seq_len)
common = dict(vocab_size=len(data.vocab), d_model=48, n_layers=1, n_heads=4, max_seq_len=seq_len)
sizes = dict(d_ff=48, n_experts=n_experts, top_k=2)
strategies = {  # (MoE options, model options)
    "softmax, no aux loss": (dict(router="softmax", capacity_factor=1.0), dict(aux_coef=0.0)),
    "softmax + aux loss": (dict(router="softmax", capacity_factor=1.0), dict(aux_coef=0.01)),
    "noisy top-k": (dict(router="noisy", capacity_factor=1.0), dict(aux_coef=0.0, noisy_coef=0.01)),
    "sigmoid + aux-free bias": (dict(router="sigmoid", capacity_factor=1.0, bias_update_rate=1e-2),
                                dict(aux_coef=0.0)),
    "expert choice": (dict(router="expert_choice"), dict(aux_coef=0.0)),
}


def train(options):
    """Train for `steps`; return the validation loss and the routing stats of the last 20 steps."""
    moe_options, model_options = options
    model = MoETransformer(TransformerConfig(**common, **model_options, moe={**sizes, **moe_options}), seed=0)
    optimizer = AdamW(model.parameters(), lr=3e-3)
    batches = np.random.default_rng(1)
    loads, dropped = [], []
    for step in range(steps):
        inputs, targets = data.batch(batches, "train", batch_size, seq_len)
        loss, _ = model.loss(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        stats = model.moe_layers()[0].stats
        if step >= steps - 20:
            loads.append(stats.requested_per_expert)
            dropped.append(stats.dropped_fraction)
    validation = [data.batch(np.random.default_rng(2 + i), "val", batch_size, seq_len) for i in range(4)]
    with tm.no_grad():
        model.eval()
        val_loss = np.mean([model.loss(x, y)[1]["cross_entropy"] for x, y in validation])
    return val_loss, np.mean(loads, axis=0), float(np.mean(dropped))


print(f"{'router':26s} {'val loss':>9s} {'max/mean load':>14s} {'dropped':>8s}   tokens asked of each expert")
results = {}
for name, options in strategies.items():
    val_loss, load, dropped = train(options)
    results[name] = load
    print(f"{name:26s} {val_loss:9.3f} {load.max() / load.mean():14.2f} {dropped:8.1%}   "
          + " ".join(f"{count:4.0f}" for count in load))
print("max/mean load 1.00 is perfect balance; with capacity factor 1.0 everything above the mean is dropped.")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed; skipping the plot")
else:
    figure, axes = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for position, (name, load) in enumerate(results.items()):
        axes.bar(np.arange(n_experts) + position * width, load / load.mean(), width, label=name)
    axes.axhline(1.0, color="grey", linestyle="--")
    axes.set_xticks(np.arange(n_experts) + width * (len(results) - 1) / 2, [str(e) for e in range(n_experts)])
    axes.set_xlabel("expert")
    axes.set_ylabel("load / mean load")
    axes.set_title("tokens asked of each expert (last 20 steps)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs("runs/examples", exist_ok=True)
    figure.savefig("runs/examples/routing_strategies.png", dpi=110)
    print("wrote runs/examples/routing_strategies.png")
