"""Sampling from an `MoETransformer` with a KV cache: the prompt is run once (prefill), then one token per step.

    prefill   h = E[prompt] + P[0 .. n−1];  every block writes its keys/values of the n tokens to the cache
    step      h = E[token] + P[n];          every block appends one key/value row and attends over n + 1 keys
    next      p = softmax(logits / temperature) over the top_k best (temperature 0: argmax)

The model's positions are learned absolute embeddings P[0 .. max_seq_len−1] and its context is the last
max_seq_len tokens, re-numbered from position 0 (what uncached generation always did). While the sequence
fits in the window the cached rows stay valid; once it is longer, each step's window starts one token later,
so every token's position (and hence every cached key) changes: those steps recompute the whole window, as
before. The cache is only used when a token's hidden state does not depend on the other tokens of the
forward: dropless token-choice MoE layers (capacity_factor None, router not "expert_choice"); with capacity
(or expert choice) a token's routing depends on the whole window, so those models also recompute it, which
keeps the sampled tokens those of the uncached loop.
"""
from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ..engine.autograd import no_grad
from ..engine.checks import check_finite
from .kv_cache import KVCache


def next_token(logits, temperature: float, top_k, generator) -> int:
    """One token id from the float64 logits (V,): argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits (ties at the k-th kept)."""
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.size:
        logits[logits < np.sort(logits)[-top_k]] = -math.inf
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    return int(generator.choice(logits.size, p=probabilities))


def can_cache(model) -> bool:
    """True when every MoE layer routes each token on its own (dropless token choice): then a token's hidden
    states are the same whichever tokens share its forward, and cached keys/values equal recomputed ones."""
    return all(layer.config.capacity_factor is None and layer.config.router != "expert_choice"
               for layer in model.moe_layers())


@no_grad()
def cached_forward(model, tokens, cache: KVCache):
    """Logits (V,) float64 of the last of `tokens` (new ids (L,), at positions cache.length .. + L − 1), after
    appending every block's keys/values of them to `cache`. Runs under no_grad; call it in eval mode."""
    xp = model.token_embedding.weight.xp
    start, new = cache.length, len(tokens)
    h = model.token_embedding(xp.asarray(np.asarray(tokens, dtype=np.int64)[None, :]))
    h = h + model.position_embedding(xp.arange(start, start + new))
    for index, block in enumerate(model.blocks):
        attention = block.attention
        x = block.attention_norm(h)
        q, k, v = (attention._heads(projection(x), 1, new)
                   for projection in (attention.query, attention.key, attention.value))
        keys, values = cache.update(index, k, v)
        attended = F.scaled_dot_product_attention(q, keys, values, causal=True)  # queries at the end of the keys
        h = h + block.dropout(attention.out(attended.transpose(0, 2, 1, 3).reshape(1, new, model.config.d_model)))
        h = h + block.dropout(block.ffn(block.ffn_norm(h)))
    cache.advance(new)
    logits = F.linear(model.final_norm(h), model.token_embedding.weight)
    check_finite(logits.data, "MoETransformer: logits are not finite (NaN or inf): check the embedding and "
                              "attention weights (the MoE and dense blocks checked their outputs)")
    return logits.numpy()[0, -1].astype(np.float64)


def generate_tokens(model, prompt: list, length: int, temperature: float, top_k, generator, use_cache=None) -> list:
    """`length` new ids after `prompt` (checked ids); the loop of MoETransformer.generate (module docstring).
    use_cache: None = when `can_cache(model)`, False = recompute the window every step (the reference)."""
    window = model.config.max_seq_len
    use_cache = can_cache(model) if use_cache is None else use_cache
    tokens = list(prompt)
    cache = KVCache(model.config.n_layers, 1, window) if use_cache and len(tokens) <= window else None
    pending = list(tokens)  # ids not in the cache yet
    for _ in range(length):
        if cache is not None and len(tokens) <= window:
            logits = cached_forward(model, pending, cache)
        else:
            context = np.asarray(tokens[-window:], dtype=np.int64)[None, :]
            logits = model.forward(context).numpy()[0, -1].astype(np.float64)
        token = next_token(logits, temperature, top_k, generator)
        tokens.append(token)
        pending = [token]
    return tokens[len(prompt):]
