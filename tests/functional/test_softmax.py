"""softmax, log_softmax, logsumexp: values against plain NumPy sums, gradients, any axis, logits of ±1e4."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf

HYPOTHESIS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# Plain formulas, fine for moderate logits (the tests below keep them moderate when they use these).
def softmax_reference(x, axis):
    return np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True)


def log_softmax_reference(x, axis):
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def logsumexp_reference(x, axis, keepdims=False):
    return np.log(np.exp(x).sum(axis=axis, keepdims=keepdims))


OPS = [
    ("softmax", F.softmax, softmax_reference, "softmax"),
    ("log_softmax", F.log_softmax, log_softmax_reference, "log_softmax"),
    ("logsumexp", F.logsumexp, logsumexp_reference, "logsumexp"),
]
IDS = [row[0] for row in OPS]


@st.composite
def array_and_axis(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2**16))
    return 3.0 * np.random.default_rng(seed).standard_normal(shape), axis


@given(case=array_and_axis())
@HYPOTHESIS
def test_forward_matches_plain_formulas_on_any_axis(device, case):
    x, axis = case
    t = leaf(x, device)
    np.testing.assert_allclose(host(F.softmax(t, axis=axis)), softmax_reference(x, axis), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(host(F.log_softmax(t, axis=axis)), log_softmax_reference(x, axis), rtol=1e-12,
                               atol=1e-13)
    np.testing.assert_allclose(host(F.logsumexp(t, axis=axis)), logsumexp_reference(x, axis), rtol=1e-12, atol=1e-13)
    kept = F.logsumexp(t, axis=axis, keepdims=True)
    np.testing.assert_allclose(host(kept), logsumexp_reference(x, axis, keepdims=True), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(host(F.softmax(t, axis=axis)).sum(axis=axis), 1.0, rtol=1e-13)


@pytest.mark.parametrize("name, op, reference, torch_name", OPS, ids=IDS)
@pytest.mark.parametrize("shape, axis", [((5,), 0), ((3, 4), -1), ((3, 4), 0), ((2, 3, 4), 1)])
def test_gradient_matches_finite_differences(device, name, op, reference, torch_name, shape, axis):
    x = leaf(np.random.default_rng(1).standard_normal(shape), device)
    assert tm.gradcheck(lambda t: op(t, axis=axis), [x])


def test_logsumexp_keepdims_gradient(device):
    x = leaf(np.random.default_rng(2).standard_normal((3, 4)), device)
    assert tm.gradcheck(lambda t: F.logsumexp(t, axis=0, keepdims=True), [x])


@pytest.mark.parametrize("name, op, reference, torch_name", OPS, ids=IDS)
def test_forward_and_gradient_match_torch(device, name, op, reference, torch_name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = 1e3 * rng.standard_normal((4, 6))  # large spread: stability matters for both
    ours = leaf(x, device)
    out = op(ours, axis=0)
    cotangent = rng.standard_normal(out.shape)
    out.backward(cotangent)
    theirs = torch.tensor(x, requires_grad=True)
    expected = getattr(torch, torch_name)(theirs, 0)
    expected.backward(torch.tensor(cotangent))
    np.testing.assert_allclose(host(out), expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(ours.grad), theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_of_magnitude_1e4_give_finite_exact_values_and_gradients(device, dtype):
    x = np.array([[1e4, -1e4, 1e4], [-1e4, -1e4, 0.0]])
    with np.errstate(over="raise", invalid="raise"):
        soft, logsoft, lse = (leaf(x, device, dtype=dtype) for _ in range(3))
        probabilities = F.softmax(soft)
        log_probabilities = F.log_softmax(logsoft)
        totals = F.logsumexp(lse)
        for out, t in ((probabilities, soft), (log_probabilities, logsoft), (totals, lse)):
            out.backward(np.random.default_rng(4).standard_normal(out.shape))
            assert np.isfinite(host(out)).all()
            assert np.isfinite(host(t.grad)).all()
    np.testing.assert_allclose(host(probabilities), [[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]], atol=1e-7)
    half = -math.log(2)
    np.testing.assert_allclose(host(log_probabilities), [[half, -2e4 + half, half], [-1e4, -1e4, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(host(totals), [1e4 + math.log(2), 0.0], rtol=1e-7, atol=1e-6)


def test_gradcheck_holds_at_logits_of_magnitude_1e4(device):
    x = leaf(1e4 * np.sign(np.random.default_rng(5).standard_normal((3, 4))) + np.arange(12).reshape(3, 4), device)
    for op in (F.softmax, F.log_softmax, F.logsumexp):
        assert tm.gradcheck(op, [x], eps=1e-3)


def test_minus_infinity_entries_are_masked_not_nan(device):
    x = np.array([[0.0, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf]])
    np.testing.assert_array_equal(host(F.softmax(leaf(x[:1], device))), [[0.5, 0.0, 0.5]])
    np.testing.assert_allclose(host(F.log_softmax(leaf(x[:1], device))), [[-math.log(2), -np.inf, -math.log(2)]])
    with np.errstate(divide="ignore"):  # log(0) = -inf for the all-masked row is the intended answer
        np.testing.assert_array_equal(host(F.logsumexp(leaf(x, device))), [math.log(2), -np.inf])


def test_float32_is_close_to_float64(device):
    x = 5 * np.random.default_rng(6).standard_normal((4, 7))
    for op in (F.softmax, F.log_softmax, F.logsumexp):
        out32 = op(leaf(x, device, dtype="float32"))
        assert out32.dtype == np.float32
        np.testing.assert_allclose(host(out32), host(op(leaf(x, device))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, op, reference, torch_name", OPS, ids=IDS)
def test_bad_input_is_rejected_naming_the_argument(device, name, op, reference, torch_name):
    x = leaf(np.zeros((2, 3)), device)
    with pytest.raises(ValueError, match=r"axis=2 is out of range for an input with 2 dimension"):
        op(x, axis=2)
    with pytest.raises(ValueError, match=r"axis=-3 is out of range"):
        op(x, axis=-3)
    with pytest.raises(TypeError, match=r"axis=1\.0 must be an int"):
        op(x, axis=1.0)
    with pytest.raises(TypeError, match=r"\bx must be a Tensor"):
        op(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"x is 0-d"):
        op(leaf(1.0, device))
    with pytest.raises(ValueError, match=r"axis=1 of x .* is empty"):
        op(leaf(np.zeros((2, 0)), device), axis=1)


def test_logsumexp_rejects_non_bool_keepdims(device):
    with pytest.raises(TypeError, match="keepdims=1"):
        F.logsumexp(leaf(np.zeros(3), device), keepdims=1)
