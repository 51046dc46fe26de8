"""Mixtral-format weights in and out of tinymoe.

A Mixtral sparse-MoE block holds a router `gate.weight` (E, d) and, per expert, `w1` and `w3` (ff, d) and
`w2` (d, ff): y = Σ_{e in top-2} softmax(top-2 logits)_e · w2_e (silu(w1_e x) ⊙ w3_e x).
This script makes such weights (small and random, named as in a real checkpoint), saves them as a
.safetensors file, loads them into a tinymoe MoE layer and checks its output against the formula above
written directly in NumPy.

    python examples/mixtral_layer.py       # NumPy alone: tinymoe reads and writes .safetensors itself
"""
import os

import numpy as np

import tinymoe as tm

d_model, d_ff, n_experts, top_k = 32, 64, 8, 2
prefix = "model.layers.0.block_sparse_moe."
rng = np.random.default_rng(0)

# 1. Mixtral-named weights, as a checkpoint would hold them (float32 here; real ones are bfloat16,
#    which load_safetensors widens to float32).
weights = {prefix + "gate.weight": rng.standard_normal((n_experts, d_model)).astype(np.float32) * 0.2}
for expert in range(n_experts):
    weights[f"{prefix}experts.{expert}.w1.weight"] = rng.standard_normal((d_ff, d_model)).astype(np.float32) * 0.1
    weights[f"{prefix}experts.{expert}.w3.weight"] = rng.standard_normal((d_ff, d_model)).astype(np.float32) * 0.1
    weights[f"{prefix}experts.{expert}.w2.weight"] = rng.standard_normal((d_model, d_ff)).astype(np.float32) * 0.1

# 2. Save to .safetensors (atomically) and read it back.
os.makedirs("runs/examples", exist_ok=True)
path = "runs/examples/mixtral_layer.safetensors"
tm.io.save_safetensors(weights, path)
loaded = tm.io.load_safetensors(path)
print(f"{path}: {len(loaded)} tensors, e.g. {prefix}experts.0.w1.weight {loaded[prefix + 'experts.0.w1.weight'].shape}")

# 3. A tinymoe layer with Mixtral's semantics (softmax top-2, renormalised weights, SwiGLU experts).
moe = tm.nn.MoE(d_model=d_model, d_ff=d_ff, n_experts=n_experts, top_k=top_k, activation="swiglu",
                normalize_top_k=True)
tm.io.load_mixtral(moe, loaded)          # the prefix is found; missing, extra or mis-shaped keys raise an error
moe.eval()

x = rng.standard_normal((4, 10, d_model)).astype(np.float32)            # (batch, sequence, d_model)
with tm.no_grad():
    y = moe(tm.tensor(x)).numpy()


# 4. The same layer written out in NumPy, token by token, straight from the checkpoint's arrays.
def mixtral_reference(tokens):
    gate = loaded[prefix + "gate.weight"]
    out = np.zeros_like(tokens)
    for t, token in enumerate(tokens):
        logits = gate @ token
        chosen = np.argsort(-logits, kind="stable")[:top_k]
        weights_chosen = np.exp(logits[chosen] - logits[chosen].max())
        weights_chosen /= weights_chosen.sum()
        for weight, expert in zip(weights_chosen, chosen):
            w1, w3, w2 = (loaded[f"{prefix}experts.{expert}.{name}.weight"] for name in ("w1", "w3", "w2"))
            hidden = w1 @ token
            out[t] += weight * (w2 @ (hidden / (1 + np.exp(-hidden)) * (w3 @ token)))
    return out


reference = mixtral_reference(x.reshape(-1, d_model)).reshape(x.shape)
error = np.abs(y - reference).max() / np.abs(reference).max()
print(f"tinymoe vs the formula: max relative difference {error:.2e}")
print(f"tokens per expert: {moe.stats.tokens_per_expert.tolist()}, aux loss {moe.aux_loss.item():.3f} "
      f"(1.0 = perfectly balanced; transformers reports k times this)")
assert error < 1e-5, "the layer does not match Mixtral's formula"

# 5. And back out, under Mixtral's per-expert names.
exported = tm.io.mixtral_state_dict(moe)
same = all(np.array_equal(exported[name], loaded[prefix + name]) for name in exported)
print(f"mixtral_state_dict(): {len(exported)} arrays, identical to the file: {same}")
