"""Inference with NumPy as the only dependency: load a trained checkpoint and use the model in an app.

tinymoe needs nothing but NumPy at run time. With the dispatch kernels forced to the NumPy reference,
neither Numba nor CuPy is imported (this script checks that at the end).

    tinymoe train --out runs/tinymoe                 # once: a checkpoint to embed
    python examples/embed_numpy_only.py runs/tinymoe

Without a checkpoint it first trains a tiny one (a few seconds) so the example always runs.
"""
import os
import sys

os.environ["TINYMOE_KERNELS"] = "numpy"   # before importing tinymoe: the pure-NumPy dispatch path

import numpy as np  # noqa: E402

import tinymoe as tm  # noqa: E402
from tinymoe.train.checkpoint import load_trained_model  # noqa: E402

checkpoint = sys.argv[1] if len(sys.argv) > 1 else "runs/tinymoe"
if not os.path.exists(os.path.join(checkpoint, "checkpoint.npz")):
    from tinymoe.models import TransformerConfig
    from tinymoe.train.corpus import generate_corpus
    from tinymoe.train.data import CharData
    from tinymoe.train.loop import TrainConfig, Trainer

    print(f"no checkpoint in {checkpoint}; training a tiny one into runs/examples/tiny (run `tinymoe train` "
          "for a better model)")
    checkpoint = "runs/examples/tiny"
    os.makedirs(checkpoint, exist_ok=True)
    data = CharData.from_text(generate_corpus(50_000), seq_len=32)
    config = TransformerConfig(vocab_size=len(data.vocab), d_model=32, n_layers=1, max_seq_len=32, moe=dict(d_ff=64))
    Trainer(config, TrainConfig(steps=60, seq_len=32, eval_every=60, eval_batches=2), data, checkpoint,
            stream=open(os.devnull, "w")).run()

# 1. Load: the model comes back in eval mode, with the vocabulary it was trained on.
model, vocab = load_trained_model(checkpoint)
print(f"loaded {model.num_parameters():,} parameters, {len(vocab)} symbols, "
      f"{len(model.moe_layers())} MoE layer(s) of {model.config.moe.n_experts} experts")

# 2. Score text: the probability of each next character, computed by hand from the logits.
prompt = "the small fox "
tokens = np.array([[vocab.index(c) for c in prompt]])
with tm.no_grad():
    logits = model(tokens).numpy()[0, -1]
probabilities = np.exp(logits - logits.max())
probabilities /= probabilities.sum()
top = np.argsort(-probabilities)[:5]
print(f"after {prompt!r} the model expects: " + ", ".join(f"{vocab[i]!r} {probabilities[i]:.2f}" for i in top))

# 3. Generate, and look at where the last forward sent the tokens.
continuation = model.generate([vocab.index(c) for c in prompt], length=60, temperature=0.7, generator=0)
print("sample:", prompt + "".join(vocab[t] for t in continuation).split("\n")[0])
for index, layer in enumerate(model.moe_layers()):
    print(f"MoE layer {index}: tokens per expert in the last forward {layer.stats.kept_per_expert.tolist()}")

# 4. The proof: nothing but NumPy was needed.
print("numba imported:", "numba" in sys.modules, "| cupy imported:", "cupy" in sys.modules)
assert "numba" not in sys.modules and "cupy" not in sys.modules
