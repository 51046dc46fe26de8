"""The classic mixture of local experts (Jacobs, Jordan, Nowlan & Hinton 1991) on a piecewise function.

A softmax gate looks at the input and weighs the experts' answers:

    y(x) = Σ_e g_e(x) · f_e(x),   g(x) = softmax(W_g · [x, 1])

In tinymoe this is an MoE layer with top_k = n_experts (every expert active). Trained to minimise the
error of the blend y(x), experts cooperate and regions stay blurred. Jacobs et al. instead train with the
competitive objective of a mixture model,

    E = −log Σ_e g_e(x) · exp(−(target − f_e(x))² / 2),

which rewards the gate for sending each input to the one expert that fits it best: the experts become
local, and the gate cuts the line into regions. Watch the printout: often one expert wins no region at
all. That is expert collapse (the rich get richer), which load-balancing losses exist to prevent — see
examples/routing_strategies.py.

    python examples/mixture_of_local_experts.py          # prints the regions, writes runs/examples/local_experts.png
"""
import os

import numpy as np

import tinymoe as tm
import tinymoe.functional as F
from tinymoe.optim import Adam

rng = np.random.default_rng(0)
n_experts = 3


def target(x):
    """Three regimes: a sine wave, a flat shelf, a rising line."""
    return np.where(x < -1, np.sin(3 * x), np.where(x < 1, 0.5, 0.5 + 1.5 * (x - 1)))


def features(x):
    """Each input as [x, 1]: the constant lets the router's linear logits place boundaries anywhere."""
    return tm.tensor(np.stack([x, np.ones_like(x)], axis=-1), dtype="float32")


def every_expert(moe, inputs):
    """(T, E): each expert's own answer for every input (channel 0), by giving each expert all T rows."""
    n_rows = inputs.shape[0]
    copies = F.concatenate([inputs] * n_experts, axis=0)                  # rows of expert e: [e·T, (e+1)·T)
    offsets = [expert * n_rows for expert in range(n_experts + 1)]
    answers = moe.experts(copies, offsets)[:, 0]
    return answers.reshape(n_experts, n_rows).T


# 1. A dense MoE: 3 experts, all active; output channel 0 is the prediction.
moe = tm.nn.MoE(d_model=2, d_ff=32, n_experts=n_experts, top_k=n_experts, activation="gelu", seed=0)
optimizer = Adam(moe.parameters(), lr=1e-2)

# 2. Train with the competitive objective on random points of [-3, 3].
for step in range(1, 1501):
    x = rng.uniform(-3, 3, size=256)
    inputs = features(x)
    log_gate = F.log_softmax(moe.router(inputs).logits, axis=1)         # (T, E)
    squared_error = (every_expert(moe, inputs) - tm.tensor(target(x)[:, None], dtype="float32")) ** 2
    loss = -F.logsumexp(log_gate - 0.5 * squared_error, axis=1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 300 == 0:
        print(f"step {step:4d}  mixture negative log-likelihood {loss.item():.4f}")

# 3. Look inside: the gate's probabilities, each expert's answer, and the blend the MoE layer computes.
grid = np.linspace(-3, 3, 400)
with tm.no_grad():
    moe.eval()
    blend = moe(features(grid)).numpy()[:, 0]                            # Σ_e g_e · f_e
    gate = moe.router(features(grid)).probs.numpy()                      # (400, E)
    answers = every_expert(moe, features(grid)).numpy()                  # (400, E)
print(f"mean squared error of the blend on the grid: {np.mean((blend - target(grid)) ** 2):.4f}")
for expert in range(n_experts):
    region = grid[gate.argmax(axis=1) == expert]
    span = f"x in [{region.min():+.2f}, {region.max():+.2f}]" if region.size else "no region"
    print(f"expert {expert} leads on {span}")

# 4. Plot (needs matplotlib: pip install 'tinymoe[plot]').
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed; skipping the plot")
else:
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(grid, target(grid), "k--", label="target")
    top.plot(grid, blend, "k", linewidth=2, label="gated blend")
    for expert in range(n_experts):
        top.plot(grid, answers[:, expert], alpha=0.6, label=f"expert {expert} alone")
    top.set_ylim(-2, 4)
    top.set_ylabel("y")
    top.legend(loc="upper left", fontsize=8)
    top.set_title("each expert's fit and the gated blend")
    bottom.stackplot(grid, gate.T, labels=[f"expert {e}" for e in range(n_experts)], alpha=0.8)
    bottom.set_ylabel("gate probability")
    bottom.set_ylim(0, 1)
    bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("x")
    bottom.set_title("which expert the gate picks")
    figure.tight_layout()
    os.makedirs("runs/examples", exist_ok=True)
    figure.savefig("runs/examples/local_experts.png", dpi=110)
    print("wrote runs/examples/local_experts.png")
