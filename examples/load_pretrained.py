"""Run a transformers checkpoint (Llama, Qwen2/3, Mixtral, Qwen3-MoE, OLMoE) with NumPy alone.

    python examples/load_pretrained.py                        # a tiny random Qwen3-MoE, written here first
    python examples/load_pretrained.py path/to/checkpoint     # a directory with config.json + *.safetensors

A checkpoint directory is what transformers' `save_pretrained` writes or the Hub ships: config.json and
model.safetensors (or shards with model.safetensors.index.json). tinymoe reads the config, checks that
every tensor the config implies is there with its shape, widens bfloat16 to float32, and runs the model on
its own layers (attention with RoPE and grouped-query heads, tinymoe's MoE layer for the sparse blocks).
Token ids in, token ids out: tokenizing text is left to a tokenizer of your choice.
"""
import sys
import tempfile

import numpy as np

import tinymoe as tm
from tinymoe.models.hf_model import HFCausalLM
from tinymoe.models.pretrained import from_pretrained

if len(sys.argv) > 1:
    directory = sys.argv[1]
else:
    # 1. A tiny Qwen3-MoE checkpoint with random weights: the config.json fields a real one has, shrunk.
    config = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
              "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128, "eos_token_id": 1}
    directory = tempfile.mkdtemp(prefix="tinymoe-qwen3-moe-")
    HFCausalLM(config, seed=0).save_pretrained(directory)  # config.json + model.safetensors, Hub layout
    print(f"wrote a random {config['model_type']} checkpoint to {directory}")

# 2. Load it: every tensor checked against config.json, bfloat16 widened, cast to float32.
model = from_pretrained(directory, dtype="float32")
spec = model.spec
print(f"{spec.model_type}: {spec.num_layers} layers, hidden {spec.hidden_size}, {model.num_parameters():,} "
      f"parameters, {len(model.moe_layers())} MoE layers of {spec.n_experts} experts (top-{spec.top_k})")

# 3. Logits for a batch of token ids, and the router's load-balance loss of each MoE layer.
prompt = np.array([[2, 3, 4, 5], [5, 4, 3, 2]]) % spec.vocab_size
with tm.no_grad():
    logits = model(prompt)
print("logits", logits.shape, "aux losses", [round(loss.item(), 4) for loss in model.aux_losses()])

# 4. Generation with a KV cache: greedy, then sampled (temperature, top-k, top-p, a seed for repeatability).
print("greedy :", model.generate(prompt, max_new_tokens=8).tolist())
print("sampled:", model.generate(prompt, max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=0).tolist())
