"""Generation without torch: KV-cached decoding equals recomputing the whole context (float64), greedy picks
the argmax, sampling is reproducible by seed, top-k / top-p keep exactly the support their formulas give
(counts over many draws), eos stops a sequence and pads it, and bad arguments raise."""
import numpy as np
import pytest

import tinymoe as tm
from hf_model_helpers import CONFIGS
from tinymoe.models.generation import next_token_distribution, sample_tokens
from tinymoe.models.hf_model import HFCausalLM

PROMPT = np.array([[1, 5, 0, 7], [4, 4, 2, 11]])


def model_of(case, seed=0):
    return HFCausalLM(CONFIGS[case], dtype="float64", seed=seed)


@pytest.mark.parametrize("case", ["mixtral_sliding", "qwen3_moe", "olmoe", "llama_tied_bias", "qwen2", "qwen2_moe",
                                  "gpt_oss", "deepseek_v3"])
def test_cached_logits_equal_the_full_forward(case):
    model = model_of(case)
    ids = np.random.default_rng(1).integers(0, 13, (2, 10))  # 10 tokens: past the sliding window of 3
    with tm.no_grad():
        full = model(ids).numpy()
        cache = model.new_cache(batch=2, capacity=10)
        chunks = [model(ids[:, :3], cache), model(ids[:, 3:5], cache)]  # a prefill in two pieces
        chunks += [model(ids[:, t:t + 1], cache) for t in range(5, 10)]  # then one token per step
    assert cache.length == 10
    np.testing.assert_allclose(np.concatenate([chunk.numpy() for chunk in chunks], axis=1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["mixtral", "qwen3"])
def test_greedy_tokens_are_the_argmax_of_the_full_context(case):
    model = model_of(case, seed=2)
    out = model.generate(PROMPT, max_new_tokens=6)
    assert out.shape == (2, 10) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, :4], PROMPT)
    with tm.no_grad():
        logits = model(out[:, :-1]).numpy()
    np.testing.assert_array_equal(out[:, 4:], logits[:, 3:].argmax(axis=-1))
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=6, use_cache=False), out)


def test_sampling_is_reproducible_by_seed():
    model = model_of("qwen3_moe", seed=3)
    first = model.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=7)
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=7), first)
    assert not np.array_equal(model.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=8), first)
    cached_free = model.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=7, use_cache=False)
    np.testing.assert_array_equal(cached_free, first)


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    model = model_of("olmoe", seed=4)
    greedy = model.generate(PROMPT, max_new_tokens=8)
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_k=1, seed=0), greedy)
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=8, temperature=2.0, top_p=1e-9, seed=0), greedy)


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 1.0])


def formula_distribution(logits, temperature, top_k=None, top_p=None):
    """The sampling distribution by its definition, one token at a time."""
    z = logits / temperature
    kept = set(range(len(z)))
    if top_k is not None:
        kth = sorted(z, reverse=True)[top_k - 1]
        kept = {i for i in kept if z[i] >= kth}
    p = {i: np.exp(z[i]) for i in kept}
    total = sum(p.values())
    p = {i: value / total for i, value in p.items()}
    if top_p is not None:
        mass, nucleus = 0.0, set()
        for i in sorted(p, key=lambda i: (-p[i], i)):
            if mass < top_p:
                nucleus.add(i)
            mass += p[i]
        total = sum(p[i] for i in nucleus)
        p = {i: p[i] / total for i in nucleus}
    return np.array([p.get(i, 0.0) for i in range(len(z))])


@pytest.mark.parametrize("temperature, top_k, top_p, support", [
    (1.0, None, None, 7), (1.0, 2, None, 2), (1.0, 6, None, 6), (1.3, None, 0.8, 4), (1.0, None, 0.6, 2),
    (1.0, None, 0.5, 1), (0.9, 4, 0.9, 3),
    (0.7, 3, None, 4),  # the two logits 1.0 tie at the 3rd place: both kept (transformers' rule: z >= k-th)
])
def test_top_k_and_top_p_sample_the_formula_distribution(temperature, top_k, top_p, support):
    expected = formula_distribution(LOGITS, temperature, top_k, top_p)
    assert np.count_nonzero(expected) == support
    draws = 40000
    probs = next_token_distribution(np.tile(LOGITS, (draws, 1)), temperature, top_k, top_p)
    np.testing.assert_allclose(probs[0], expected, rtol=1e-12, atol=1e-15)
    tokens = sample_tokens(probs, np.random.default_rng(0))
    counts = np.bincount(tokens, minlength=len(LOGITS))
    assert np.all(counts[expected == 0] == 0)  # nothing outside the support, ever
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(counts / draws - expected) <= 5 * sigma + 1e-12)


def test_eos_stops_a_sequence_and_pads_it():
    model = model_of("mixtral", seed=5)
    free = model.generate(PROMPT, max_new_tokens=8)  # no eos: never stops early
    eos = int(free[0, 6])  # the third new token of sequence 0
    out = model.generate(PROMPT, max_new_tokens=8, eos_token_id=eos, pad_token_id=12)
    first_eos = [int(np.flatnonzero(row[4:] == eos)[0]) + 4 if eos in row[4:] else None for row in free]
    for row, stop, generated in zip(out, first_eos, free):
        if stop is None:
            np.testing.assert_array_equal(row, generated[:len(row)])
        else:
            np.testing.assert_array_equal(row[:stop + 1], generated[:stop + 1])
            assert np.all(row[stop + 1:] == 12)
    finished_by = max(stop if stop is not None else 11 for stop in first_eos)
    assert out.shape[1] == min(finished_by + 1, 12)  # stops once every sequence has its eos
    default_pad = model.generate(PROMPT, max_new_tokens=8, eos_token_id=[eos])
    assert np.all(np.isin(default_pad[:, out.shape[1]:], [eos]))  # pads with the eos when the config has no pad


def test_generation_restores_training_mode_and_leaves_no_graph():
    model = model_of("qwen3_moe").train()
    model.generate(PROMPT, max_new_tokens=2)
    assert model.training
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("arguments, match", [
    (dict(temperature=-1.0), "temperature=-1.0 must be a number >= 0"),
    (dict(top_k=3), "apply to sampling; set temperature > 0"),
    (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(temperature=1.0, top_p=1.5), r"top_p=1.5 must be a number in \(0, 1\]"),
    (dict(temperature=1.0, top_p=0.0), "top_p=0.0"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(eos_token_id=13), r"eos_token_id=13 must be an int or ints in \[0, 13\)"),
    (dict(pad_token_id=-2), "pad_token_id"),
])
def test_bad_generation_arguments_raise(arguments, match):
    with pytest.raises(ValueError, match=match):
        model_of("llama").generate(PROMPT, **arguments)


def test_bad_prompts_and_cache_misuse_raise():
    model = model_of("llama")
    with pytest.raises(ValueError, match=r"prompt_ids must be a \(batch, length\) integer array"):
        model.generate(np.array([1, 2, 3]))
    cache = model.new_cache(batch=2, capacity=5)
    with tm.no_grad():
        model(PROMPT, cache)
        with pytest.raises(ValueError, match="4 cached \\+ 2 new tokens exceed capacity=5"):
            model(PROMPT[:, :2], cache)
        with pytest.raises(ValueError, match="input_ids have batch 1 but the cache holds 2"):
            model(PROMPT[:1, :1], cache)
    with pytest.raises(RuntimeError, match="run decoding under tinymoe.no_grad"):
        model(PROMPT, model.new_cache(batch=2, capacity=8))


@pytest.mark.parametrize("kernels", tm.kernels.available("cpu"))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["mixtral_sliding", "qwen3_moe", "olmoe", "llama_tied_bias", "qwen3", "mixtral",
                                  "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_decoding_fast_path_equals_the_regular_forward_bit_for_bit(case, dtype, kernels):
    """next_token_logits (plain arrays, generate's path) against the Tensor forward: the same bits per step."""
    model = HFCausalLM(CONFIGS[case], dtype=dtype, seed=3).eval()
    ids = np.random.default_rng(2).integers(0, 13, (1, 9))  # 9 tokens: past the sliding window of 3
    with tm.kernels.use(kernels), tm.no_grad():
        regular_cache, fast_cache = model.new_cache(1, 9), model.new_cache(1, 9)
        prefill_regular = model(ids[:, :4], regular_cache).numpy()[:, -1]
        prefill_fast = model.next_token_logits(ids[:, :4], fast_cache)
        # the prefill's head runs on the last row only (a GEMV instead of one GEMM over every row): rounding
        np.testing.assert_allclose(prefill_fast, prefill_regular, rtol=0, atol=1e-5 if dtype == "float32" else 1e-12)
        for t in range(4, 9):
            regular = model(ids[:, t:t + 1], regular_cache).numpy()[:, -1]
            fast = model.next_token_logits(ids[:, t:t + 1], fast_cache)
            assert fast.dtype == np.dtype(dtype) and fast.shape == (1, 13)
            np.testing.assert_array_equal(fast, regular)
    assert fast_cache.length == regular_cache.length == 9


def test_fast_path_batch_and_fallbacks_equal_the_forward():
    """A batch of 2 (the MoE layers run their module) and grad mode (the regular forward) give its logits."""
    model = model_of("qwen3_moe", seed=6)
    with tm.no_grad():
        regular_cache, fast_cache = model.new_cache(2, 6), model.new_cache(2, 6)
        model(PROMPT, regular_cache), model.next_token_logits(PROMPT, fast_cache)
        step = np.array([[3], [9]])
        np.testing.assert_allclose(model.next_token_logits(step, fast_cache),
                                   model(step, regular_cache).numpy()[:, -1], rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="run decoding under tinymoe.no_grad"):
        model.next_token_logits(PROMPT, model.new_cache(batch=2, capacity=8))
    with tm.no_grad(), pytest.raises(ValueError, match=r"expected \[0, vocab_size=13\)"):
        model.next_token_logits(np.array([[13]] * 2), model.new_cache(batch=2, capacity=8))


def test_a_streamer_gets_the_prompt_then_each_token_as_transformers_streamers():
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, ids):
            self.calls.append(np.array(ids))

        def end(self):
            self.calls.append("end")

    model, recorder = model_of("mixtral", seed=5), Recorder()
    out = model.generate(PROMPT, max_new_tokens=3, streamer=recorder)
    assert len(recorder.calls) == 5 and recorder.calls[-1] == "end"
    np.testing.assert_array_equal(recorder.calls[0], PROMPT)
    for step in range(3):
        np.testing.assert_array_equal(recorder.calls[1 + step], out[:, 4 + step])


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen2_moe"])
def test_decoding_equals_the_regular_forward_bit_for_bit_at_benchmark_widths(case):
    """Hidden 512 with 8 query and 4 key/value heads of 64: the stacked q|k|v matrix (1024 x 512) is big enough
    for OpenBLAS to split its GEMV over threads, unlike the three separate ones; qwen2_moe adds q/k/v biases.
    A 12-token prefill takes the three separate GEMMs; each step after must match exactly."""
    config = dict(CONFIGS[case], hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=64)
    if case == "qwen2_moe":
        config.update(shared_expert_intermediate_size=96, mlp_only_layers=[])
    model = HFCausalLM(config, dtype="float32", seed=4).eval()
    ids = np.random.default_rng(5).integers(0, 13, (1, 16))
    with tm.no_grad():
        regular_cache, fast_cache = model.new_cache(1, 16), model.new_cache(1, 16)
        model(ids[:, :12], regular_cache), model.next_token_logits(ids[:, :12], fast_cache)
        for t in range(12, 16):
            np.testing.assert_array_equal(model.next_token_logits(ids[:, t:t + 1], fast_cache),
                                          model(ids[:, t:t + 1], regular_cache).numpy()[:, -1])
