"""MoETransformer.generate with a KV cache: the same tokens as the plain loop that runs the model on the last
max_seq_len tokens at every step (the oracle below, written from the definition), greedy and seeded sampling,
inside and beyond the context window; temperature 0 is argmax; models whose routing depends on the window
(capacity, expert choice) recompute it."""
import math

import numpy as np
import pytest

from tinymoe.models import MoETransformer
from tinymoe.models.kv_cache import KVCache
from tinymoe.models.transformer_generation import cached_forward, can_cache
from transformer_helpers import VOCAB, numpy_kernels, random_tokens, tiny_config  # noqa: F401  (autouse fixture)


def window_loop(model, prompt, length, temperature, top_k=None, seed=0):
    """The oracle: every step runs model.forward on the last max_seq_len tokens (positions from 0)."""
    generator = np.random.default_rng(seed)
    model.eval()
    tokens = list(prompt)
    for _ in range(length):
        window = np.asarray(tokens[-model.config.max_seq_len:])[None, :]
        logits = model(window).numpy()[0, -1].astype(np.float64)
        if temperature == 0:
            tokens.append(int(np.argmax(logits)))
            continue
        logits = logits / temperature
        if top_k is not None:
            logits[logits < np.sort(logits)[-top_k]] = -math.inf
        p = np.exp(logits - logits.max())
        tokens.append(int(generator.choice(VOCAB, p=p / p.sum())))
    model.train()
    return tokens[len(prompt):]


MODELS = [dict(), dict(dtype="float32"), dict(router="sigmoid", n_shared_experts=1, moe_layers=[0]),
          dict(router="top_p", top_p=0.5), dict(router="noisy")]


@pytest.mark.parametrize("overrides", MODELS, ids=["softmax", "float32", "sigmoid+dense", "top_p", "noisy"])
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (2.0, 3)], ids=["greedy", "sample", "top3"])
def test_cached_generation_gives_the_tokens_of_the_window_loop(overrides, temperature, top_k):
    model = MoETransformer(tiny_config(**overrides), seed=5)
    assert can_cache(model)
    prompt = [3, 1, 4]
    # 3 + 14 tokens: the last 9 steps run past max_seq_len = 8
    expected = window_loop(model, prompt, 14, temperature, top_k, seed=7)
    assert model.generate(prompt, 14, temperature, top_k, generator=7) == expected
    assert model.generate(prompt, 14, temperature, top_k, generator=7, use_cache=False) == expected
    assert model.training


def test_the_cache_is_used_inside_the_window_only(monkeypatch):
    model = MoETransformer(tiny_config(), seed=1)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens: calls.append(np.shape(tokens)) or forward(tokens))
    model.generate([1, 2, 3], 10, generator=0)
    # contexts of 3..8 tokens come from the cache; 9..12 tokens exceed the window of 8: recomputed, 8 wide
    assert calls == [(1, 8)] * 4
    calls.clear()
    model.generate(random_tokens(12, seed=2).tolist(), 3, generator=0)  # a prompt longer than the window
    assert calls == [(1, 8)] * 3


def test_cached_logits_equal_the_full_forward():
    model = MoETransformer(tiny_config(n_shared_experts=1), seed=3).eval()
    tokens = random_tokens(8, seed=4).tolist()
    cache = KVCache(2, 1, 8)
    got = [cached_forward(model, tokens[:5], cache)] + [cached_forward(model, [t], cache) for t in tokens[5:]]
    full = model(np.asarray(tokens)[None, :]).numpy()[0]
    np.testing.assert_allclose(np.stack(got), full[4:], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("overrides", [dict(capacity_factor=1.0), dict(router="expert_choice")])
def test_window_dependent_routing_recomputes_the_window(overrides):
    model = MoETransformer(tiny_config(**overrides), seed=2)
    assert not can_cache(model)
    assert model.generate([5, 6], 9, 1.0, generator=3) == window_loop(model, [5, 6], 9, 1.0, seed=3)
    with pytest.raises(ValueError, match="use_cache=True needs dropless token-choice"):
        model.generate([5, 6], 2, use_cache=True)


def test_temperature_zero_is_greedy_and_ignores_the_generator():
    model = MoETransformer(tiny_config(), seed=8)
    greedy = window_loop(model, [2, 7], 10, 0.0)
    assert model.generate([2, 7], 10, temperature=0, generator=1) == greedy
    assert model.generate([2, 7], 10, temperature=0.0, top_k=3, generator=99) == greedy
    with pytest.raises(TypeError, match="use_cache='yes' must be None, True or False"):
        model.generate([2], 1, use_cache="yes")
