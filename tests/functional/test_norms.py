"""rms_norm and layer_norm: values against NumPy statistics and torch, hand-written gradients, errors."""
import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf


def rms_norm_reference(x, weight=None, eps=1e-6):
    root_mean_square = np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)
    return x / root_mean_square * (1.0 if weight is None else weight)


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5):
    normalized = (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    return normalized * (1.0 if weight is None else weight) + (0.0 if bias is None else bias)


AFFINE = [(False, False), (True, False), (False, True), (True, True)]  # (weight, bias)


@pytest.mark.parametrize("shape", [(6,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("with_weight", [False, True])
def test_rms_norm_matches_numpy_and_gradchecks(device, shape, with_weight):
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal(shape), rng.standard_normal(shape[-1])
    inputs = [leaf(x, device)] + ([leaf(weight, device)] if with_weight else [])
    out = F.rms_norm(*inputs)
    np.testing.assert_allclose(host(out), rms_norm_reference(x, weight if with_weight else None), rtol=1e-12)
    assert tm.gradcheck(F.rms_norm, inputs)


@pytest.mark.parametrize("shape", [(6,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("with_weight, with_bias", AFFINE)
def test_layer_norm_matches_numpy_and_gradchecks(device, shape, with_weight, with_bias):
    rng = np.random.default_rng(1)
    x, weight, bias = rng.standard_normal(shape), rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    weight_t = leaf(weight, device) if with_weight else None
    bias_t = leaf(bias, device) if with_bias else None
    x_t = leaf(x, device)
    out = F.layer_norm(x_t, weight_t, bias_t)
    expected = layer_norm_reference(x, weight if with_weight else None, bias if with_bias else None)
    np.testing.assert_allclose(host(out), expected, rtol=1e-12, atol=1e-13)
    inputs = [t for t in (x_t, weight_t, bias_t) if t is not None]
    assert tm.gradcheck(lambda *ts: F.layer_norm(x_t, weight_t, bias_t), inputs)


def test_norms_match_torch(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x, weight, bias, cotangent = (rng.standard_normal(shape) for shape in ((2, 3, 8), (8,), (8,), (2, 3, 8)))
    ours = [leaf(a, device) for a in (x, weight, bias)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    F.layer_norm(*ours, eps=1e-5).backward(cotangent)
    torch.nn.functional.layer_norm(theirs[0], (8,), theirs[1], theirs[2], eps=1e-5).backward(torch.tensor(cotangent))
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(host(mine.grad), reference.grad.numpy(), rtol=1e-10, atol=1e-12)
    ours = [leaf(a, device) for a in (x, weight)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, weight)]
    out = F.rms_norm(*ours, eps=1e-6)
    out.backward(cotangent)
    expected = torch.nn.functional.rms_norm(theirs[0], (8,), theirs[1], eps=1e-6)
    expected.backward(torch.tensor(cotangent))
    np.testing.assert_allclose(host(out), expected.detach().numpy(), rtol=1e-12)
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(host(mine.grad), reference.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", [F.rms_norm, F.layer_norm], ids=["rms_norm", "layer_norm"])
def test_zero_rows_stay_finite_through_eps(device, op):
    x = leaf(np.zeros((2, 4)), device)
    out = op(x)
    out.backward(np.random.default_rng(3).standard_normal((2, 4)))
    np.testing.assert_array_equal(host(out), np.zeros((2, 4)))
    assert np.isfinite(host(x.grad)).all()


@pytest.mark.parametrize("op", [F.rms_norm, F.layer_norm], ids=["rms_norm", "layer_norm"])
def test_large_inputs_are_scale_invariant_and_gradients_check(device, op):
    x = np.random.default_rng(4).standard_normal((3, 5))
    np.testing.assert_allclose(host(op(leaf(1e6 * x, device))), host(op(leaf(x, device), eps=1e-18)), rtol=1e-9)
    assert tm.gradcheck(op, [leaf(1e3 * x, device)], eps=1e-3)


@pytest.mark.parametrize("op", [F.rms_norm, F.layer_norm], ids=["rms_norm", "layer_norm"])
def test_float32_is_close_to_float64(device, op):
    rng = np.random.default_rng(5)
    x, weight = rng.standard_normal((4, 16)), rng.standard_normal(16)
    out32 = op(leaf(x, device, dtype="float32"), leaf(weight, device, dtype="float32"))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(host(out32), host(op(leaf(x, device), leaf(weight, device))), rtol=1e-5, atol=1e-5)


def test_eps_changes_the_result_as_documented(device):
    x = np.array([[3.0, 4.0]])
    out = F.rms_norm(leaf(x, device), eps=0.5)
    np.testing.assert_allclose(host(out), x / np.sqrt(12.5 + 0.5), rtol=1e-14)


@pytest.mark.parametrize("op, name", [(F.rms_norm, "rms_norm"), (F.layer_norm, "layer_norm")])
def test_norms_reject_bad_input(device, op, name):
    x = leaf(np.zeros((2, 4)), device)
    with pytest.raises(ValueError, match=rf"{name}: weight has shape \(5,\), expected \(4,\)"):
        op(x, leaf(np.zeros(5), device))
    with pytest.raises(ValueError, match=r"weight has shape \(1, 4\)"):
        op(x, leaf(np.zeros((1, 4)), device))
    with pytest.raises(TypeError, match=r"weight must be a Tensor"):
        op(x, np.zeros(4))
    with pytest.raises(TypeError, match=r"weight is float32 but x is float64"):
        op(x, leaf(np.zeros(4), device, dtype="float32"))
    with pytest.raises(ValueError, match=r"eps=-1\.0 must be >= 0"):
        op(x, eps=-1.0)
    with pytest.raises(TypeError, match=r"eps='small'"):
        op(x, eps="small")
    with pytest.raises(TypeError, match=r"\bx must be a Tensor"):
        op(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D\) with D >= 1"):
        op(leaf(np.zeros((2, 0)), device))


def test_layer_norm_rejects_a_bad_bias(device):
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        F.layer_norm(leaf(np.zeros((2, 4)), device), None, leaf(np.zeros(3), device))


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_backward_twice_with_retain_graph_doubles_the_gradients_exactly(op):
    """dx is built in one buffer in place: a second backward must find the saved x̂ and r unchanged."""
    rng = np.random.default_rng(5)
    x, weight = leaf(rng.standard_normal((3, 4, 6)), dtype="float32"), leaf(rng.standard_normal(6), dtype="float32")
    cotangent = rng.standard_normal((3, 4, 6)).astype(np.float32)
    out = getattr(F, op)(x, weight)
    out.backward(cotangent, retain_graph=True)
    first_x, first_weight = x.grad.copy(), weight.grad.copy()
    out.backward(cotangent)
    np.testing.assert_array_equal(x.grad, 2 * first_x)
    np.testing.assert_array_equal(weight.grad, 2 * first_weight)
