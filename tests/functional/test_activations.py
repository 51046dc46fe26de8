"""Elementwise activations: forward against independent NumPy formulas (and torch when present),
hand-written gradients against finite differences, float32 against float64, extreme inputs, bad input."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf

math_erf = np.vectorize(math.erf, otypes=[np.float64])


def away_from_zero(rng, shape):
    """Normal samples pushed at least 0.1 from 0 (relu's kink)."""
    x = rng.standard_normal(shape)
    return np.where(x >= 0, x + 0.1, x - 0.1)


def positive(rng, shape):
    return rng.uniform(0.2, 3.0, shape)


def normal(rng, shape):
    return 2.0 * rng.standard_normal(shape)


# name, op, NumPy reference (written out here, not taken from the package), input sampler, torch equivalent
ACTIVATIONS = [
    ("relu", F.relu, lambda x: np.where(x > 0, x, 0.0), away_from_zero, lambda t, x: t.relu(x)),
    ("gelu", F.gelu, lambda x: x * 0.5 * (1.0 + math_erf(x / math.sqrt(2.0))), normal,
     lambda t, x: t.nn.functional.gelu(x)),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"),
     lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))), normal,
     lambda t, x: t.nn.functional.gelu(x, approximate="tanh")),
    ("silu", F.silu, lambda x: x / (1.0 + np.exp(-x)), normal, lambda t, x: t.nn.functional.silu(x)),
    ("sigmoid", F.sigmoid, lambda x: 1.0 / (1.0 + np.exp(-x)), normal, lambda t, x: t.sigmoid(x)),
    ("softplus", F.softplus, lambda x: np.log(1.0 + np.exp(x)), normal, lambda t, x: t.nn.functional.softplus(x)),
    ("tanh", F.tanh, lambda x: (np.exp(x) - np.exp(-x)) / (np.exp(x) + np.exp(-x)), normal, lambda t, x: t.tanh(x)),
    ("exp", F.exp, lambda x: math.e**x, normal, lambda t, x: t.exp(x)),
    ("log", F.log, lambda x: np.log2(x) / np.log2(math.e), positive, lambda t, x: t.log(x)),
]
IDS = [row[0] for row in ACTIVATIONS]
ONE_ELEMENT_SETTINGS = settings(max_examples=10, deadline=None,
                                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name, op, reference, sample, torch_op", ACTIVATIONS, ids=IDS)
def test_forward_matches_numpy_formula(device, name, op, reference, sample, torch_op):
    x = sample(np.random.default_rng(0), (3, 5))
    out = op(leaf(x, device))
    assert out.shape == x.shape and out.dtype == np.float64
    np.testing.assert_allclose(host(out), reference(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, op, reference, sample, torch_op", ACTIVATIONS, ids=IDS)
def test_gradient_matches_finite_differences(device, name, op, reference, sample, torch_op):
    x = leaf(sample(np.random.default_rng(1), (4, 6)), device)
    assert tm.gradcheck(op, [x])


@pytest.mark.parametrize("name, op, reference, sample, torch_op", ACTIVATIONS, ids=IDS)
def test_forward_and_gradient_match_torch(device, name, op, reference, sample, torch_op):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x, cotangent = sample(rng, (5, 7)), rng.standard_normal((5, 7))
    ours = leaf(x, device)
    out = op(ours)
    out.backward(cotangent)
    theirs = torch.tensor(x, requires_grad=True)
    expected = torch_op(torch, theirs)
    expected.backward(torch.tensor(cotangent))
    np.testing.assert_allclose(host(out), expected.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(host(ours.grad), theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, op, reference, sample, torch_op", ACTIVATIONS, ids=IDS)
def test_float32_forward_and_gradient_are_close_to_float64(device, name, op, reference, sample, torch_op):
    x = sample(np.random.default_rng(3), (6, 8))
    out64, out32 = op(leaf(x, device)), op(leaf(x, device, dtype="float32"))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(host(out32), host(out64), rtol=2e-6, atol=1e-6)
    x32 = leaf(x, device, dtype="float32")
    op(x32).sum().backward()
    x64 = leaf(x, device)
    op(x64).sum().backward()
    assert x32.grad.dtype == np.float32
    np.testing.assert_allclose(host(x32.grad), host(x64.grad), rtol=2e-5, atol=1e-5)


@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3))
@ONE_ELEMENT_SETTINGS
def test_activations_keep_any_shape(device, shape):
    x = np.random.default_rng(4).standard_normal(shape) + 3.0  # positive enough for log
    for name, op, reference, _, _ in ACTIVATIONS:
        out = op(leaf(x, device))
        assert out.shape == tuple(shape), name
        np.testing.assert_allclose(host(out), reference(x), rtol=1e-12, atol=1e-14, err_msg=name)


def test_softplus_is_exact_and_finite_at_plus_minus_100_and_1000(device):
    x = np.array([-1e4, -1000.0, -100.0, 100.0, 1000.0, 1e4])
    t = leaf(x, device)
    with np.errstate(over="raise", invalid="raise"):
        out = F.softplus(t)
        out.backward(np.ones_like(x))
    np.testing.assert_allclose(host(out), [0.0, 0.0, math.exp(-100.0), 100.0, 1000.0, 1e4], rtol=1e-15, atol=0)
    np.testing.assert_allclose(host(t.grad), [0.0, 0.0, math.exp(-100.0), 1.0, 1.0, 1.0], rtol=1e-15, atol=0)


@pytest.mark.parametrize("name, op, expected_low, expected_high, slope_high", [
    ("sigmoid", F.sigmoid, 0.0, 1.0, 0.0),
    ("silu", F.silu, -0.0, 1e4, 1.0),
    ("gelu", F.gelu, -0.0, 1e4, 1.0),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), -0.0, 1e4, 1.0),
    ("tanh", F.tanh, -1.0, 1.0, 0.0),
    ("relu", F.relu, 0.0, 1e4, 1.0),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_saturating_activations_stay_finite_at_1e4(device, name, op, expected_low, expected_high, slope_high, dtype):
    t = leaf([-1e4, 1e4], device, dtype=dtype)
    with np.errstate(over="raise", invalid="raise"):
        out = op(t)
        out.backward(np.ones(2))
    np.testing.assert_allclose(host(out), [expected_low, expected_high], rtol=1e-6, atol=0)
    np.testing.assert_allclose(host(t.grad), [0.0, slope_high], atol=1e-6)


def test_relu_gradient_is_zero_at_zero_and_for_negatives(device):
    t = leaf([-2.0, 0.0, 3.0], device)
    F.relu(t).backward(np.array([5.0, 7.0, 11.0]))
    np.testing.assert_array_equal(host(t.grad), [0.0, 0.0, 11.0])


@pytest.mark.parametrize("name, op, reference, sample, torch_op", ACTIVATIONS, ids=IDS)
def test_non_tensor_input_is_rejected_naming_x(name, op, reference, sample, torch_op):
    with pytest.raises(TypeError, match=r"\bx must be a Tensor"):
        op(np.ones(3))
    with pytest.raises(TypeError, match=r"\bx must be a floating Tensor"):
        op(tm.tensor([1.0, -1.0]) > 0)  # a bool Tensor


def test_gelu_rejects_unknown_approximation(device):
    with pytest.raises(ValueError, match="approximate='fast'"):
        F.gelu(leaf([1.0], device), approximate="fast")
