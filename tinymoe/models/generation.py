"""Autoregressive decoding with a KV cache: greedy, or sampling with temperature, top-k and top-p.

    prefill:  logits = model(prompt, cache)               the whole prompt once; the cache keeps its keys/values
    step:     t = choose(logits[:, -1]);  logits = model(t, cache)     one token per step

choose: temperature 0 -> argmax (greedy). Otherwise, in this order (transformers' order of logits processors):
    z = logits / temperature
    top-k (Fan et al. 2018): keep tokens whose z >= the k-th largest z (ties at the k-th kept)
    top-p (nucleus, Holtzman et al. 2020): sort p = softmax(z) descending, keep a token when the
          probability mass before it is < top_p (so the most likely token is always kept)
    sample from p renormalised over the kept tokens, by inverse CDF with u ~ U[0, 1) from
          numpy.random.default_rng(seed): the same seed gives the same tokens.
"""
from __future__ import annotations

import numbers

import numpy as np

from ..engine.autograd import no_grad
from ..engine.backend import to_numpy
from ..engine.checks import require_int


def _eos_ids(eos_token_id, vocab_size):
    if eos_token_id is None:
        return ()
    values = (eos_token_id,) if isinstance(eos_token_id, numbers.Integral) else tuple(eos_token_id)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < vocab_size:
            raise ValueError(f"generate: eos_token_id={eos_token_id!r} must be an int or ints in [0, {vocab_size})")
    return tuple(int(value) for value in values)


def _check_sampling(temperature, top_k, top_p, vocab_size):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"generate: temperature={temperature!r} must be a number >= 0 (0 = greedy)")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(f"generate: top_k={top_k!r} / top_p={top_p!r} apply to sampling; set temperature > 0 "
                         "(temperature=0 is greedy decoding)")
    if top_k is not None:
        require_int(top_k, "top_k", "generate", low=1, high=vocab_size)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p={top_p!r} must be a number in (0, 1]")


def next_token_distribution(logits, temperature: float, top_k=None, top_p=None) -> np.ndarray:
    """The distribution (B, V) float64 that sampling draws from, for logits (B, V) (module docstring)."""
    scores = np.asarray(logits, dtype=np.float64) / float(temperature)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = -np.partition(-scores, top_k - 1, axis=-1)[:, top_k - 1:top_k]
        scores = np.where(scores >= kth, scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_tokens(probs, generator) -> np.ndarray:
    """One token per row of probs (B, V) by inverse CDF: the first index whose cumulative mass exceeds u·total."""
    cdf = np.cumsum(probs, axis=-1)
    u = generator.random(probs.shape[0]) * cdf[:, -1]
    return np.argmax(cdf > u[:, None], axis=-1).astype(np.int64)


def step_logits(model, ids, cache):
    """The logits (B, V) after ids (B, L) that follow the cache: the model's `next_token_logits` (a fast path
    for decoding) where it has one, else the last position of its forward."""
    fast = getattr(model, "next_token_logits", None)
    return fast(ids, cache) if fast is not None else model(ids, cache).data[:, -1]


def generate(model, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k=None, top_p=None,
             seed=None, eos_token_id=None, pad_token_id=None, use_cache: bool = True, streamer=None) -> np.ndarray:
    """Continue each prompt of prompt_ids (B, L) ints (equal lengths, no padding) by up to max_new_tokens.

    Returns ints (B, L + n), n <= max_new_tokens: decoding stops after max_new_tokens or once every
    sequence has produced an eos token. eos_token_id: an int, several ints, or None (never stop early; the
    config's eos is not used unless passed, e.g. eos_token_id=model.spec.eos_token_id). After its eos a
    sequence is filled with pad_token_id, default the config's pad_token_id, else the (first) eos id, as
    transformers does. temperature 0 = greedy; > 0 samples (with top_k, top_p; module docstring) from
    numpy.random.default_rng(seed). use_cache=False recomputes the whole context each step (a reference).
    streamer: None or an object with put(ids) and end(), as transformers' streamers: put gets the prompt
    (B, L), then each step's tokens (B,) as soon as they are chosen; end() once decoding stops.
    Runs in eval mode under no_grad; the model's mode is restored after.
    """
    ids = np.asarray(to_numpy(prompt_ids) if hasattr(prompt_ids, "__cuda_array_interface__") else prompt_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"generate: prompt_ids must be a (batch, length) integer array with length >= 1, got "
                         f"shape {ids.shape} of {ids.dtype}")
    max_new_tokens = require_int(max_new_tokens, "max_new_tokens", "generate", low=0)
    vocab = model.vocab_size
    _check_sampling(temperature, top_k, top_p, vocab)
    eos = _eos_ids(eos_token_id, vocab)
    if pad_token_id is None:
        pad_token_id = model.pad_token_id if model.pad_token_id is not None else (eos[0] if eos else 0)
    pad_token_id = require_int(pad_token_id, "pad_token_id", "generate", low=0, high=vocab - 1)
    generator = np.random.default_rng(seed)
    batch, length = ids.shape
    tokens = ids.astype(np.int64)
    finished = np.zeros(batch, dtype=bool)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            cache = model.new_cache(batch, length + max_new_tokens) if use_cache else None
            if streamer is not None:
                streamer.put(tokens.copy())
            last = step_logits(model, tokens, cache) if use_cache else None
            for _ in range(max_new_tokens):
                if not use_cache:
                    last = model(tokens).data[:, -1]
                last = to_numpy(last).astype(np.float64)
                if temperature == 0:
                    chosen = np.argmax(last, axis=-1).astype(np.int64)
                else:
                    chosen = sample_tokens(next_token_distribution(last, temperature, top_k, top_p), generator)
                chosen = np.where(finished, pad_token_id, chosen)
                tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
                if streamer is not None:
                    streamer.put(chosen.copy())
                finished |= np.isin(chosen, eos)
                if finished.all():
                    break
                if use_cache:
                    last = step_logits(model, chosen[:, None], cache)
        if streamer is not None:
            streamer.end()
    finally:
        model.train(was_training)
    return tokens
