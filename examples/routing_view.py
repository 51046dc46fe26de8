"""Which experts a text visits: per-layer expert load of a transformers MoE checkpoint, as a heat map.

    python examples/routing_view.py                           # a tiny random Qwen3-MoE, written here first
    python examples/routing_view.py path/to/checkpoint "some text to route"

The text is tokenized with the checkpoint's tokenizer.json when the `tokenizers` package is installed
(pip install 'tinymoe[hf]'), else as its UTF-8 bytes modulo the vocabulary (enough to see routing at work).
One forward pass; after it every MoE layer's `stats.kept_per_expert` holds the rows each expert processed.
The heat map shows each layer's share of assignments per expert (a balanced layer is 1/E everywhere) and,
on the right, max/mean load per layer: 1.0 is perfect balance, E means one expert took every token.
Writes runs/examples/routing_view.png.
"""
import os
import sys
import tempfile

import numpy as np

import tinymoe as tm
from tinymoe.models import HFCausalLM, from_pretrained

TEXT = "A mixture of experts sends every token to a few of its experts; the router decides which ones."

if len(sys.argv) > 1:
    directory = sys.argv[1]
else:
    # A tiny random Qwen3-MoE checkpoint: the config.json fields of a real one, shrunk.
    config = {"model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
              "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512}
    directory = tempfile.mkdtemp(prefix="tinymoe-routing-")
    HFCausalLM(config, seed=0).save_pretrained(directory)
    print(f"wrote a random qwen3_moe checkpoint to {directory}")
text = sys.argv[2] if len(sys.argv) > 2 else TEXT

model = from_pretrained(directory)
spec = model.spec
try:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).encode(text).ids
    how = "tokenizer.json"
except Exception:  # no tokenizers package or no tokenizer.json: bytes will do to watch the router
    ids = [byte % spec.vocab_size for byte in text.encode("utf-8")]
    how = "UTF-8 bytes"
print(f"{len(ids)} tokens ({how}) through {len(model.moe_layers())} MoE layers of {spec.n_experts} experts "
      f"(top-{spec.top_k})")

with tm.no_grad():
    model.eval()(np.array([ids]))
layers = [index for index, layer in enumerate(model.model.layers) if layer.is_moe]
load = np.array([moe.stats.kept_per_expert for moe in model.moe_layers()], dtype=np.float64)  # (layers, E)
share = load / load.sum(axis=1, keepdims=True)
imbalance = load.max(axis=1) / load.mean(axis=1)
for layer, row, ratio in zip(layers, load.astype(int), imbalance):
    print(f"layer {layer}: tokens per expert {row.tolist()}, max/mean {ratio:.2f}")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("matplotlib is not installed (pip install 'tinymoe[plot]'): printed the load only")

figure, (heat, bars) = plt.subplots(1, 2, figsize=(10, 0.6 * len(layers) + 2.2),
                                    gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
image = heat.imshow(share, cmap="viridis", aspect="auto", vmin=0)
for (row, column), value in np.ndenumerate(load):
    heat.text(column, row, f"{int(value)}", ha="center", va="center", fontsize=8,
              color="white" if share[row, column] < 0.6 * share.max() else "black")
heat.set_xticks(range(load.shape[1]))
heat.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
heat.set_xlabel("expert (numbers: tokens routed to it)")
heat.set_title(f"share of each layer's assignments ({len(ids)} tokens x top-{spec.top_k}); balanced = "
               f"{1 / load.shape[1]:.3f}", fontsize=10)
figure.colorbar(image, ax=heat, fraction=0.04, label="share")
bars.barh(range(len(layers)), imbalance, color="tab:orange")
bars.axvline(1.0, color="gray", linestyle="--", linewidth=1)
bars.set_xlim(0, load.shape[1])  # E: one expert takes every token
bars.set_xlabel("max / mean load")
bars.set_title("imbalance (1 = balanced)", fontsize=10)
figure.tight_layout()
os.makedirs("runs/examples", exist_ok=True)
figure.savefig("runs/examples/routing_view.png", dpi=120)
print("wrote runs/examples/routing_view.png")
