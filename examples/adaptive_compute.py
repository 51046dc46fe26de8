"""Adaptive compute: which characters does a top-p router give more experts?

Huang et al. 2024 ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models") route each token to the
fewest experts whose probabilities sum to at least p, so a token the router is unsure about takes more of
them. Here a small MoE language model with router="top_p" (1..top_k experts per token) learns tinymoe's
generated corpus (sentences, sums like "17 + 25 = 42", records like "name=ada age=36"); then validation
text runs through it and every character is counted with the number of real experts it took, averaged per
class: digit, letter, space, punctuation (everything else: = + - . and the newline).

    python examples/adaptive_compute.py      # prints a table, writes runs/examples/adaptive_compute.png

The experts per token of one forward are the valid slots of the router's decision (`Routing.valid`, (T, k)
bool), computed here by running the blocks step by step; `moe.stats.experts_per_token` is their mean.
"""
import os
import time

import numpy as np

import tinymoe as tm
from tinymoe.engine.backend import to_numpy
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.optim import AdamW, clip_grad_norm
from tinymoe.train.corpus import generate_corpus
from tinymoe.train.data import CharData

steps, batch_size, seq_len, top_k, top_p = 250, 16, 48, 4, 0.5
data = CharData.from_text(generate_corpus(200_000), seq_len)
config = TransformerConfig(vocab_size=len(data.vocab), d_model=48, n_layers=2, n_heads=4, max_seq_len=seq_len,
                           moe=dict(d_ff=48, n_experts=8, top_k=top_k, router="top_p", top_p=top_p))
model = MoETransformer(config, seed=0)
optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
generator = np.random.default_rng(0)
started = time.perf_counter()
for step in range(1, steps + 1):
    inputs, targets = data.batch(generator, "train", batch_size, seq_len)
    total, parts = model.loss(inputs, targets)
    optimizer.zero_grad()
    total.backward()
    clip_grad_norm(optimizer.parameters(), 1.0)
    optimizer.step()
    if step % 50 == 0:
        experts = np.mean([layer.stats.experts_per_token for layer in model.moe_layers()])
        print(f"step {step:3d}  loss {parts['cross_entropy']:.3f}  experts/token {experts:.2f}")
print(f"trained {model.num_parameters():,} parameters in {time.perf_counter() - started:.0f} s")


@tm.no_grad()
def experts_per_character(model, tokens):
    """(n_moe_layers, L) experts each token of `tokens` (L,) took in each MoE layer: Block.forward, spelled out
    so that each MoE layer's input can be routed once more to read its decision."""
    xp = model.token_embedding.weight.xp
    h = model.token_embedding(xp.asarray(tokens[None, :])) + model.position_embedding(xp.arange(len(tokens)))
    counts = []
    for block in model.blocks:
        h = h + block.attention(block.attention_norm(h))
        x = block.ffn_norm(h)
        if block.is_moe:
            routing = block.ffn.router(x.reshape(-1, model.config.d_model))
            counts.append(to_numpy(routing.valid).sum(axis=1))
        h = h + block.ffn(x)
    return np.stack(counts)


def character_class(character: str) -> str:
    if character.isdigit():
        return "digit"
    if character.isalpha():
        return "letter"
    return "space" if character == " " else "punctuation"


model.eval()
classes = ("digit", "letter", "space", "punctuation")
per_class = {name: [] for name in classes}
for start in range(0, min(len(data.val), 40 * seq_len) - seq_len, seq_len):
    window = data.val[start:start + seq_len]
    counts = experts_per_character(model, window)  # (layers, L)
    for position, token in enumerate(window):
        per_class[character_class(data.vocab[token])].append(counts[:, position])

print(f"\nexperts per token (top_p={top_p}, at most {top_k}), validation text, by character class")
print(f"{'class':<12} {'tokens':>7} " + " ".join(f"{'layer ' + str(i):>8}" for i in range(len(model.moe_layers())))
      + f" {'mean':>7}")
means = {}
for name in classes:
    values = np.array(per_class[name], dtype=np.float64)  # (tokens, layers)
    means[name] = values.mean(axis=0)
    print(f"{name:<12} {len(values):>7} " + " ".join(f"{m:8.2f}" for m in means[name])
          + f" {means[name].mean():7.2f}")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed; skipping the plot")
else:
    os.makedirs("runs/examples", exist_ok=True)
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    n_layers = len(model.moe_layers())
    width = 0.8 / n_layers
    for layer in range(n_layers):
        positions = np.arange(len(classes)) + (layer - (n_layers - 1) / 2) * width
        axis.bar(positions, [means[name][layer] for name in classes], width, label=f"MoE layer {layer}")
    axis.set_xticks(np.arange(len(classes)), classes)
    axis.set_ylabel("experts per token")
    axis.set_ylim(0, top_k)
    axis.set_title(f"top-p routing (p={top_p}, k ≤ {top_k}) on validation text")
    axis.legend()
    figure.tight_layout()
    figure.savefig("runs/examples/adaptive_compute.png", dpi=110)
    print("wrote runs/examples/adaptive_compute.png")
