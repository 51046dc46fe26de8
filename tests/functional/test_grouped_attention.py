"""grouped_query_attention: a per-query loop as reference, transformers' eager attention (Llama's with repeat_kv,
GPT-OSS's with sinks) and its masks as oracle for values and gradients, hand-written gradients in float64,
the window's inclusive/exclusive rule, queries that see no key, errors."""
import math
import types

import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf
from tinymoe.functional.grouped_attention import grouped_query_attention


def attention_loop(q, k, v, causal=True, sliding_window=None, sinks=None, scale=None):
    """One (batch, head, query) at a time: query i sits at position Lk − Lq + i; head h reads kv head h // g."""
    batch, query_heads, query_len, head_dim = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    group = query_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = np.zeros((batch, query_heads, query_len, v.shape[-1]))
    for b in range(batch):
        for h in range(query_heads):
            for i in range(query_len):
                position = key_len - query_len + i
                keys = [j for j in range(key_len)
                        if (not causal or j <= position) and (sliding_window is None or j > position - sliding_window)]
                logits = [scale * float(q[b, h, i] @ k[b, h // group, j]) for j in keys]
                extra = [] if sinks is None else [float(sinks[h])]
                if not keys:
                    continue  # documented: zero output
                peak = max(logits + extra)
                denominator = sum(math.exp(s - peak) for s in logits + extra)
                for s, j in zip(logits, keys, strict=True):
                    out[b, h, i] += math.exp(s - peak) / denominator * v[b, h // group, j]
    return out


def random_inputs(rng, batch=2, query_heads=4, kv_heads=2, query_len=3, key_len=5, head_dim=4, value_dim=None):
    return (rng.standard_normal((batch, query_heads, query_len, head_dim)),
            rng.standard_normal((batch, kv_heads, key_len, head_dim)),
            rng.standard_normal((batch, kv_heads, key_len, value_dim or head_dim)))


CASES = [
    # id: (shape keywords, causal, sliding_window, with sinks, scale)
    ("mha_full", dict(query_heads=2, kv_heads=2, query_len=4, key_len=4), False, None, False, None),
    ("gqa_causal", dict(query_len=4, key_len=4), True, None, False, None),
    ("mqa_decode", dict(query_heads=3, kv_heads=1, query_len=2, key_len=6), True, None, False, None),
    ("sliding", dict(query_len=5, key_len=5), True, 2, False, None),
    ("sliding_decode", dict(query_len=2, key_len=6), True, 3, False, None),
    ("window_of_one", dict(query_len=3, key_len=3), True, 1, False, None),
    ("sinks", dict(query_len=4, key_len=4), True, None, True, None),
    ("sinks_sliding_decode", dict(query_len=2, key_len=5), True, 2, True, None),
    ("mla_value_dim", dict(head_dim=5, value_dim=3, query_len=3, key_len=4), True, None, False, 0.37),
    ("more_queries_than_keys", dict(query_len=4, key_len=2), True, None, False, None),
    ("more_queries_than_keys_sinks", dict(query_len=4, key_len=2), True, None, True, None),
]


@pytest.mark.parametrize("shape, causal, window, with_sinks, scale", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_matches_a_loop_and_gradients_check(device, shape, causal, window, with_sinks, scale):
    rng = np.random.default_rng(0)
    q, k, v = random_inputs(rng, **shape)
    sinks = rng.standard_normal(q.shape[1]) if with_sinks else None
    expected = attention_loop(q, k, v, causal, window, sinks, scale)
    tensors = [leaf(a, device) for a in (q, k, v)] + ([leaf(sinks, device)] if with_sinks else [])

    def attend(q, k, v, sinks=None):
        return grouped_query_attention(q, k, v, causal=causal, sliding_window=window, sinks=sinks, scale=scale)

    np.testing.assert_allclose(host(attend(*tensors)), expected, rtol=1e-12, atol=1e-13)
    assert tm.gradcheck(attend, tensors, exact_max_elements=48)


def _transformers_mask(query_len, key_len, causal, window):
    """Additive (1, 1, Lq, Lk) mask from transformers' own mask functions, queries at positions Lk − Lq + i."""
    torch = pytest.importorskip("torch")
    from transformers import masking_utils

    if window is not None:
        allowed = masking_utils.sliding_window_causal_mask_function(window)
    elif causal:
        allowed = masking_utils.causal_mask_function
    else:
        return None
    mask = torch.zeros(1, 1, query_len, key_len, dtype=torch.float64)
    for i in range(query_len):
        for j in range(key_len):
            if not allowed(*(torch.tensor(n) for n in (0, 0, key_len - query_len + i, j))):
                mask[0, 0, i, j] = -math.inf
    return mask


TRANSFORMERS_CASES = [c for c in CASES if not c[0].startswith("more_queries")]  # their rows of all −inf give NaN


def _transformers_attention(attention, q, k, v, sinks, causal, window, scale, cotangent):
    """Output (B, Hq, Lq, Dv) and gradients of q, k, v, sinks from a transformers eager attention function."""
    torch = pytest.importorskip("torch")
    torch_inputs = [torch.tensor(a, requires_grad=True) for a in (q, k, v, sinks)]
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False,
                                   sinks=torch_inputs[3])
    mask = _transformers_mask(q.shape[2], k.shape[2], causal, window)
    scaling = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, _ = attention(module, *torch_inputs[:3], mask, scaling=scaling)
    out = out.transpose(1, 2)  # transformers returns (B, L, H, Dv)
    out.backward(torch.as_tensor(cotangent))
    return out.detach().numpy(), [None if t.grad is None else t.grad.numpy() for t in torch_inputs]


# (which transformers function, whether our call passes sinks, tolerance): Llama's eager softmax runs in
# float32 whatever the input dtype, hence 1e-6; GPT-OSS's runs in the input's dtype, and with sinks of −inf
# it is plain attention, a float64 oracle for the cases without sinks.
ORACLES = {
    "llama": ("llama", False, 1e-6),
    "gpt_oss_no_sink": ("gpt_oss", False, 1e-11),
    "gpt_oss_sinks": ("gpt_oss", True, 1e-11),
}


ORACLE_CASES = [pytest.param(oracle, *case[1:], id=f"{case[0]}-{oracle}")
                for case in TRANSFORMERS_CASES for oracle, (_, use_sinks, _) in ORACLES.items() if use_sinks == case[4]]


@pytest.mark.parametrize("oracle, shape, causal, window, with_sinks, scale", ORACLE_CASES)
def test_values_and_gradients_match_transformers_eager_attention(oracle, shape, causal, window, with_sinks, scale):
    pytest.importorskip("torch")
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_attention
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_attention

    family, use_sinks, tolerance = ORACLES[oracle]
    rng = np.random.default_rng(1)
    q, k, v = random_inputs(rng, **shape)
    sinks = rng.standard_normal(q.shape[1]) if use_sinks else np.full(q.shape[1], -np.inf)
    attention = gpt_oss_attention if family == "gpt_oss" else llama_attention
    cotangent = rng.standard_normal(q.shape[:3] + v.shape[-1:])
    expected, expected_grads = _transformers_attention(attention, q, k, v, sinks, causal, window, scale, cotangent)

    ours = [leaf(a) for a in (q, k, v, sinks)]
    out = grouped_query_attention(*ours[:3], causal=causal, sliding_window=window,
                                  sinks=ours[3] if use_sinks else None, scale=scale)
    out.backward(tm.tensor(cotangent, dtype="float64"))
    np.testing.assert_allclose(host(out), expected, rtol=tolerance, atol=tolerance)
    for name, mine, theirs in zip("qkvs", ours, expected_grads, strict=True):
        if name != "s" or use_sinks:
            np.testing.assert_allclose(host(mine.grad), theirs, rtol=tolerance, atol=tolerance, err_msg=name)


def test_sliding_window_sees_exactly_the_last_w_positions():
    """One-hot values reveal which keys each query averages: W = 2 sees itself and the key before."""
    key_len = 5
    q = tm.tensor(np.zeros((1, 1, key_len, 2)), dtype="float64")
    k = tm.tensor(np.zeros((1, 1, key_len, 2)), dtype="float64")
    v = tm.tensor(np.eye(key_len)[None, None], dtype="float64")
    out = host(grouped_query_attention(q, k, v, sliding_window=2))[0, 0]
    expected = np.array([[1, 0, 0, 0, 0], [.5, .5, 0, 0, 0], [0, .5, .5, 0, 0], [0, 0, .5, .5, 0], [0, 0, 0, .5, .5]])
    np.testing.assert_allclose(out, expected, atol=1e-15)


def test_sinks_take_weight_from_the_keys():
    """Equal scores over n keys and sink σ: each key gets 1 / (n + e^σ)."""
    q = tm.tensor(np.zeros((1, 2, 1, 3)), dtype="float64")
    k = tm.tensor(np.zeros((1, 1, 4, 3)), dtype="float64")
    v = tm.tensor(np.ones((1, 1, 4, 1)), dtype="float64")
    sinks = tm.tensor(np.array([0.0, math.log(4.0)]), dtype="float64")
    out = host(grouped_query_attention(q, k, v, sinks=sinks))[0, :, 0, 0]
    np.testing.assert_allclose(out, [4 / 5, 4 / 8], rtol=1e-14)


def test_large_scores_stay_finite():
    rng = np.random.default_rng(2)
    q, k, v = (leaf(a * 300) for a in random_inputs(rng))
    sinks = leaf(np.array([900.0, -900.0, 0.0, 5.0]))
    out = grouped_query_attention(q, k, v, sinks=sinks)
    out.sum().backward()
    for tensor in (out, q.grad, k.grad, v.grad, sinks.grad):
        assert np.isfinite(host(tensor)).all()


def test_errors_name_the_argument():
    rng = np.random.default_rng(3)
    q, k, v = (tm.tensor(a, dtype="float64") for a in random_inputs(rng))
    attend = grouped_query_attention
    with pytest.raises(ValueError, match="Hq must be a positive multiple of Hkv"):
        attend(tm.tensor(np.zeros((2, 3, 3, 4)), dtype="float64"), k, v)
    with pytest.raises(ValueError, match="their last axes"):
        attend(q, tm.tensor(np.zeros((2, 2, 5, 3)), dtype="float64"), v)
    with pytest.raises(ValueError, match="heads and keys"):
        attend(q, k, tm.tensor(np.zeros((2, 2, 4, 4)), dtype="float64"))
    with pytest.raises(ValueError, match="sliding_window=0 must be >= 1"):
        attend(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="needs causal=True"):
        attend(q, k, v, causal=False, sliding_window=2)
    with pytest.raises(ValueError, match=r"sinks has shape \(2,\)"):
        attend(q, k, v, sinks=tm.tensor(np.zeros(2), dtype="float64"))
    with pytest.raises(TypeError, match="sinks is float32 but q is float64"):
        attend(q, k, v, sinks=tm.tensor(np.zeros(4), dtype="float32"))
    with pytest.raises(ValueError, match="must have 4 dimension"):
        attend(tm.tensor(np.zeros((3, 4)), dtype="float64"), k, v)
    with pytest.raises(ValueError, match="batch axis"):
        attend(q, tm.tensor(np.zeros((1, 2, 5, 4)), dtype="float64"), v)
