"""Routing strategies side by side: load balance, dropped tokens, experts per token and loss on the same data.

Ten one-layer MoE language models (8 experts, top-2), identical but for the router:
    softmax, no aux loss      top-2 of softmax, nothing keeps the load even (the classic failure)
    softmax + aux loss        the Switch load-balance loss (aux_coef 0.01), f_e counted over the batch
    + sequence balance        the same loss counted per sequence and averaged (DeepSeek-V3 eq. 17-20)
    noisy top-k               Shazeer et al. 2017: noise in training + importance and load losses
    sigmoid + aux-free bias   DeepSeek-V3: a per-expert bias nudged toward balance after every step
    + groups (2, best 1)      the same, but each token may only use the 4 experts of its best group
    expert choice             Zhou et al. 2022: each expert picks its tokens, balanced by construction
    top-p (p=0.5)             Huang et al. 2024: experts by probability until they sum to 0.5 (1 or 2)
    null experts (m=2)        AdaMoE (Zeng et al. 2024): 2 extra router outputs that compute nothing
    relu (ReMoE)              Wang et al. 2025: gate = relu(logit), an adaptive L1 penalty steers sparsity
Token-choice routers run with capacity factor 1.0 (C = T·2/8 rows per expert), so an overloaded expert drops
tokens: routing imbalance becomes lost work you can see. The last four pick a variable number of experts per
token, which the "experts/token" column shows (moe.stats.experts_per_token: 2.00 for plain top-2).

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
sizes = dict(d_ff=48, n_experts=n_experts, top_k=2, capacity_factor=1.0)
aux = dict(aux_coef=0.01)
strategies = {  # (MoE options, model options)
    "softmax, no aux loss": (dict(router="softmax"), dict(aux_coef=0.0)),
    "softmax + aux loss": (dict(router="softmax"), aux),
    "  + sequence balance": (dict(router="softmax", balance="sequence"), aux),
    "noisy top-k": (dict(router="noisy"), dict(aux_coef=0.0, noisy_coef=0.01)),
    "sigmoid + aux-free bias": (dict(router="sigmoid", bias_update_rate=1e-2), dict(aux_coef=0.0)),
    "  + groups (2, best 1)": (dict(router="sigmoid", bias_update_rate=1e-2, n_groups=2, topk_groups=1),
                               dict(aux_coef=0.0)),
    "expert choice": (dict(router="expert_choice", capacity_factor=None), dict(aux_coef=0.0)),
    "top-p (p=0.5)": (dict(router="top_p", top_p=0.5), aux),
    "null experts (m=2)": (dict(router="softmax", n_null_experts=2), aux),
    # ReMoE's λ0 = 1e-8 needs thousands of steps to grow (x1.2 a step); 1e-3 reaches the target here
    "relu (ReMoE)": (dict(router="relu", l1_coefficient=1e-3), aux),
}


def train(options):
    """Train for `steps`; return the validation loss and the routing stats averaged over the last 20 steps."""
    moe_options, model_options = options
    model = MoETransformer(TransformerConfig(**common, **model_options, moe={**sizes, **moe_options}), seed=0)
    optimizer = AdamW(model.parameters(), lr=3e-3)
    batches = np.random.default_rng(1)
    loads, dropped, experts_per_token = [], [], []
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
            experts_per_token.append(stats.experts_per_token)
    validation = [data.batch(np.random.default_rng(2 + i), "val", batch_size, seq_len) for i in range(4)]
    with tm.no_grad():
        model.eval()
        val_loss = np.mean([model.loss(x, y)[1]["cross_entropy"] for x, y in validation])
    return val_loss, np.mean(loads, axis=0), float(np.mean(dropped)), float(np.mean(experts_per_token))


print(f"{'router':24s} {'val loss':>8s} {'max/mean load':>13s} {'dropped':>8s} {'experts/token':>13s}"
      "   tokens asked of each expert")
results = {}
for name, options in strategies.items():
    val_loss, load, dropped, per_token = train(options)
    results[name] = (load, dropped, per_token)
    print(f"{name:24s} {val_loss:8.3f} {load.max() / load.mean():13.2f} {dropped:8.1%} {per_token:13.2f}   "
          + " ".join(f"{count:4.0f}" for count in load))
print("max/mean load 1.00 is perfect balance; with capacity factor 1.0 everything above the mean is dropped.\n"
      "Experts/token counts real experts chosen before capacity: compute per token is proportional to it.")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed; skipping the plot")
else:
    names = list(results)
    relative_load = np.array([load / load.mean() for load, _, _ in results.values()])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw=dict(width_ratios=[3, 2]))
    image = left.imshow(relative_load, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
    for row, column in np.ndindex(relative_load.shape):
        value = relative_load[row, column]
        left.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=7,
                  color="white" if abs(value - 1) > 0.6 else "black")
    left.set_xticks(range(n_experts))
    left.set_yticks(range(len(names)), [name.strip() for name in names], fontsize=8)
    left.set_xlabel("expert")
    left.set_title("load / mean load (last 20 steps)", fontsize=10)
    figure.colorbar(image, ax=left, fraction=0.05)
    rows = np.arange(len(names))
    per_token = [per_token for _, _, per_token in results.values()]
    right.barh(rows, per_token, 0.6, color="tab:blue")
    for row, (_, dropped, count) in enumerate(results.values()):
        right.text(count + 0.05, row, f"{count:.2f}, {dropped:.0%} dropped", va="center", fontsize=7)
    right.axvline(2.0, color="grey", linestyle="--", linewidth=0.8)
    right.set_xlim(0, max(per_token) + 1.4)
    right.set_yticks(rows, [])
    right.set_ylim(len(names) - 0.5, -0.5)  # same row order as the heat map
    right.set_xlabel("real experts per token (before capacity)")
    right.set_title("compute per token, and work lost to capacity", fontsize=10)
    figure.tight_layout()
    os.makedirs("runs/examples", exist_ok=True)
    figure.savefig("runs/examples/routing_strategies.png", dpi=110)
    print("wrote runs/examples/routing_strategies.png")
