"""scaled_dot_product_attention: a per-query loop as reference, torch as oracle, causal alignment to the end,
fully masked rows, broadcast batch axes, hand-written gradients, large scores, errors."""
import math

import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf

sdpa = F.scaled_dot_product_attention


def attention_reference(q, k, v, causal=False, scale=None):
    """One query at a time: weights over the keys it may see (key j <= i + Lk − Lq when causal)."""
    query_len, key_len = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (np.broadcast_to(a, batch + a.shape[-2:]) for a in (q, k, v))
    out = np.zeros(batch + (query_len, v.shape[-1]))
    for position in np.ndindex(batch):
        for i in range(query_len):
            visible = [j for j in range(key_len) if not causal or j <= i + key_len - query_len]
            if not visible:
                continue  # documented: a query that sees no key outputs zeros
            scores = np.array([scale * float(q[position][i] @ k[position][j]) for j in visible])
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[position][i] = sum(w * v[position][j] for w, j in zip(weights, visible, strict=True))
    return out


CASES = [
    # q shape, k shape, v shape, causal
    ((3, 4), (3, 4), (3, 2), False),
    ((3, 4), (3, 4), (3, 2), True),
    ((2, 3, 4), (2, 5, 4), (2, 5, 3), False),
    ((2, 3, 4), (2, 5, 4), (2, 5, 3), True),  # Lq < Lk: queries are the last positions
    ((2, 4, 3), (2, 2, 3), (2, 2, 2), True),  # Lq > Lk: the first two queries see no key
    ((2, 2, 3, 4), (1, 5, 4), (5, 2), False),  # batch axes broadcast
    ((2, 1, 3, 4), (1, 2, 3, 4), (2, 2, 3, 2), True),
]


@pytest.mark.parametrize("q_shape, k_shape, v_shape, causal", CASES)
def test_forward_matches_a_per_query_loop_and_gradients_check(device, q_shape, k_shape, v_shape, causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape) for shape in (q_shape, k_shape, v_shape))
    tensors = [leaf(a, device) for a in (q, k, v)]
    out = sdpa(*tensors, causal=causal)
    np.testing.assert_allclose(host(out), attention_reference(q, k, v, causal), rtol=1e-12, atol=1e-14)
    assert tm.gradcheck(lambda *ts: sdpa(*ts, causal=causal), tensors, exact_max_elements=48)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_values_and_gradients(device, causal):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    cotangent = rng.standard_normal((2, 3, 5, 4))
    ours = [leaf(a, device) for a in (q, k, v)]
    out = sdpa(*ours, causal=causal, scale=0.7)
    out.backward(cotangent)
    theirs = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*theirs, is_causal=causal, scale=0.7)
    expected.backward(torch.tensor(cotangent))
    np.testing.assert_allclose(host(out), expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(host(mine.grad), reference.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_causal_mask_is_aligned_to_the_end_of_the_keys(device):
    # Two queries over four keys: query 0 sees keys 0..2, query 1 sees keys 0..3.
    q, k = leaf(np.zeros((2, 1)), device), leaf(np.zeros((4, 1)), device)
    v = leaf(np.eye(4), device)
    out = host(sdpa(q, k, v, causal=True))
    np.testing.assert_allclose(out, [[1 / 3, 1 / 3, 1 / 3, 0.0], [0.25, 0.25, 0.25, 0.25]], rtol=1e-15)


def test_queries_that_see_no_key_give_zero_output_and_gradient(device):
    rng = np.random.default_rng(2)
    tensors = [leaf(rng.standard_normal(shape), device) for shape in ((3, 2), (1, 2), (1, 2))]
    out = sdpa(*tensors, causal=True)
    np.testing.assert_array_equal(host(out)[:2], np.zeros((2, 2)))
    np.testing.assert_allclose(host(out)[2], host(tensors[2])[0], rtol=1e-15)
    out.backward(np.ones((3, 2)))
    for tensor in tensors:
        assert np.isfinite(host(tensor.grad)).all()
    np.testing.assert_array_equal(host(tensors[0].grad), np.zeros((3, 2)))  # one visible key: P = 1 exactly


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_scores_stay_finite(device, dtype):
    rng = np.random.default_rng(3)
    q, k, v = 100 * rng.standard_normal((4, 8)), 100 * rng.standard_normal((4, 8)), rng.standard_normal((4, 3))
    tensors = [leaf(a, device, dtype=dtype) for a in (q, k, v)]
    with np.errstate(over="raise", invalid="raise"):
        out = sdpa(*tensors, causal=True)
        out.backward(np.ones((4, 3)))
    assert all(np.isfinite(host(t.grad)).all() for t in tensors)
    np.testing.assert_allclose(host(out), attention_reference(q, k, v, causal=True), rtol=1e-4, atol=1e-4)


def test_float32_is_close_to_float64(device):
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((2, 6, 8)) for _ in range(3)]
    out32 = sdpa(*(leaf(a, device, dtype="float32") for a in arrays), causal=True)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(host(out32), host(sdpa(*(leaf(a, device) for a in arrays), causal=True)),
                               rtol=1e-5, atol=1e-5)


def test_default_scale_is_one_over_sqrt_d(device):
    rng = np.random.default_rng(5)
    q, k, v = (leaf(rng.standard_normal((3, 9)), device) for _ in range(3))
    np.testing.assert_allclose(host(sdpa(q, k, v)), host(sdpa(q, k, v, scale=1 / 3)), rtol=1e-15)
    assert not np.allclose(host(sdpa(q, k, v)), host(sdpa(q, k, v, scale=1.0)))


def test_only_the_needed_gradients_are_filled(device):
    rng = np.random.default_rng(6)
    q = leaf(rng.standard_normal((3, 4)), device)
    k, v = (leaf(rng.standard_normal((3, 4)), device, requires_grad=False) for _ in range(2))
    sdpa(q, k, v).sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None


def test_attention_rejects_bad_input(device):
    q, k, v = (leaf(np.zeros((2, 3, 4)), device) for _ in range(3))
    with pytest.raises(ValueError, match=r"k has shape \(2, 3, 5\) but q has shape \(2, 3, 4\)"):
        sdpa(q, leaf(np.zeros((2, 3, 5)), device), v)
    with pytest.raises(ValueError, match=r"v has shape \(2, 4, 4\) but k has shape \(2, 3, 4\)"):
        sdpa(q, k, leaf(np.zeros((2, 4, 4)), device))
    with pytest.raises(ValueError, match=r"\bq must have shape \(\.\.\., L, D\)"):
        sdpa(leaf(np.zeros(4), device), k, v)
    with pytest.raises(ValueError, match=r"batch axes of q \(2,\), k \(3,\)"):
        sdpa(q, leaf(np.zeros((3, 3, 4)), device), leaf(np.zeros((3, 3, 4)), device))
    with pytest.raises(TypeError, match=r"\bk is float32 but q is float64"):
        sdpa(q, leaf(np.zeros((2, 3, 4)), device, dtype="float32"), v)
    with pytest.raises(TypeError, match=r"\bv must be a Tensor"):
        sdpa(q, k, np.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match=r"causal=1 must be a bool"):
        sdpa(q, k, v, causal=1)
    with pytest.raises(TypeError, match=r"scale='auto' must be a finite real number"):
        sdpa(q, k, v, scale="auto")
    with pytest.raises(ValueError, match=r"k has shape \(2, 0, 4\): there must be at least one key"):
        sdpa(q, leaf(np.zeros((2, 0, 4)), device), leaf(np.zeros((2, 0, 4)), device))


def test_in_place_forward_and_backward_equal_the_plain_formula_bitwise_and_leave_inputs_alone():
    """The scores buffer is scaled, masked, normalized and differentiated in place: the results must be the
    plain formula's bit for bit (float32, where rounding order shows), the inputs untouched, and a second
    backward (retain_graph) must find the saved P unchanged: exactly twice the gradients."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 3, 6, 4)).astype(np.float32) for _ in range(3))
    cotangent = rng.standard_normal((2, 3, 6, 4)).astype(np.float32)
    scale = 0.3
    scores = (q @ k.swapaxes(-1, -2)) * scale
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = weights / weights.sum(axis=-1, keepdims=True)
    grad_probs = cotangent @ v.swapaxes(-1, -2)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True))
    expected = {"out": probs @ v, "q": (grad_scores @ k) * scale,
                "k": (grad_scores.swapaxes(-1, -2) @ q) * scale, "v": probs.swapaxes(-1, -2) @ cotangent}
    tensors = {name: tm.tensor(array, requires_grad=True) for name, array in (("q", q), ("k", k), ("v", v))}
    copies = {name: array.copy() for name, array in (("q", q), ("k", k), ("v", v))}
    out = sdpa(tensors["q"], tensors["k"], tensors["v"], causal=True, scale=scale)
    np.testing.assert_array_equal(out.numpy(), expected["out"])
    out.backward(cotangent, retain_graph=True)
    for name in "qkv":
        np.testing.assert_array_equal(tensors[name].grad, expected[name])
        np.testing.assert_array_equal(tensors[name].data, copies[name])
    out.backward(cotangent)
    for name in "qkv":
        np.testing.assert_array_equal(tensors[name].grad, 2 * expected[name])


def test_causal_mask_is_made_once_per_shape_and_read_only():
    from tinymoe.functional.attention import _hidden_keys

    first, again, other = _hidden_keys(np, 3, 5), _hidden_keys(np, 3, 5), _hidden_keys(np, 5, 3)
    assert first is again and other is not first
    np.testing.assert_array_equal(first, [[j > i + 2 for j in range(5)] for i in range(3)])
    np.testing.assert_array_equal(other, [[j > i - 2 for j in range(3)] for i in range(5)])
    with pytest.raises(ValueError):
        first[0, 0] = True
