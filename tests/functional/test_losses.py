"""cross_entropy and mse_loss: values against plain loops / NumPy, gradients, ignore_index, extremes, errors."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf
from tinymoe.engine.backend import to_device

HYPOTHESIS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def cross_entropy_reference(logits, targets, ignore_index=-100, reduction="mean"):
    """One row at a time: −log(exp(z_t) / Σ_c exp(z_c)); moderate logits only."""
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    losses = np.zeros(flat_targets.shape)
    for row, target in enumerate(flat_targets):
        if target != ignore_index:
            losses[row] = -math.log(math.exp(flat_logits[row, target]) / sum(math.exp(z) for z in flat_logits[row]))
    if reduction == "none":
        return losses.reshape(targets.shape)
    kept = int((flat_targets != ignore_index).sum())
    return losses.sum() / kept if reduction == "mean" else losses.sum()


@st.composite
def logits_and_targets(draw):
    batch_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    classes = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    targets = rng.integers(0, classes, batch_shape)
    targets = np.where(rng.random(batch_shape) < 0.3, -100, targets)
    return 2.0 * rng.standard_normal(batch_shape + (classes,)), targets


@given(case=logits_and_targets(), reduction=st.sampled_from(["mean", "sum", "none"]))
@HYPOTHESIS
def test_cross_entropy_matches_a_row_by_row_loop(device, case, reduction):
    logits, targets = case
    out = F.cross_entropy(leaf(logits, device), to_device(targets, device), reduction=reduction)
    if reduction == "mean" and (targets == -100).all():
        expected = 0.0
    else:
        expected = cross_entropy_reference(logits, targets, reduction=reduction)
    np.testing.assert_allclose(host(out), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logits_shape", [(6,), (4, 5), (2, 3, 4)])
def test_cross_entropy_gradient_matches_finite_differences(device, reduction, logits_shape):
    rng = np.random.default_rng(1)
    targets = rng.integers(0, logits_shape[-1], logits_shape[:-1])
    if targets.ndim:
        targets.flat[0] = 7  # one ignored target
    logits = leaf(rng.standard_normal(logits_shape), device)
    targets = to_device(targets, device)
    assert tm.gradcheck(lambda z: F.cross_entropy(z, targets, ignore_index=7, reduction=reduction), [logits])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(device, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    logits, targets = 3 * rng.standard_normal((2, 3, 5)), rng.integers(0, 5, (2, 3))
    targets[0, 1] = -100
    ours = leaf(logits, device)
    out = F.cross_entropy(ours, to_device(targets, device), reduction=reduction)
    cotangent = rng.standard_normal(out.shape)
    out.backward(cotangent)
    theirs = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(theirs.reshape(-1, 5), torch.tensor(targets.reshape(-1)),
                                                 reduction=reduction)
    expected.backward(torch.tensor(cotangent).reshape(expected.shape))
    np.testing.assert_allclose(host(out).reshape(-1), expected.detach().numpy().reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(host(ours.grad), theirs.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction, expected_shape", [("mean", ()), ("sum", ()), ("none", (2, 2))])
def test_all_ignored_targets_give_zero_loss_and_zero_gradient(device, reduction, expected_shape):
    logits = leaf(np.random.default_rng(3).standard_normal((2, 2, 3)), device)
    out = F.cross_entropy(logits, to_device(np.full((2, 2), -100), device), reduction=reduction)
    assert out.shape == expected_shape
    np.testing.assert_array_equal(host(out), np.zeros(expected_shape))
    out.backward(np.ones(expected_shape))
    np.testing.assert_array_equal(host(logits.grad), np.zeros((2, 2, 3)))


def test_empty_batch_mean_is_zero_not_nan(device):
    out = F.cross_entropy(leaf(np.zeros((0, 4)), device), to_device(np.zeros(0, dtype=np.int64), device))
    assert out.item() == 0.0


def test_mean_divides_by_the_kept_targets_only(device):
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]))
    targets = to_device(np.array([0, -100, 2]), device)
    out = F.cross_entropy(leaf(logits, device), targets)
    assert out.item() == pytest.approx((-math.log(0.5) - math.log(1 / 3)) / 2, rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_of_magnitude_1e4_give_finite_exact_loss_and_gradient(device, dtype):
    logits = leaf([[1e4, -1e4], [-1e4, 1e4]], device, dtype=dtype)
    with np.errstate(over="raise", invalid="raise"):
        out = F.cross_entropy(logits, to_device(np.array([1, 1]), device))
        out.backward()
    assert out.item() == pytest.approx(1e4, rel=1e-6)  # (2e4 + 0) / 2
    np.testing.assert_allclose(host(logits.grad), [[0.5, -0.5], [0.0, 0.0]], atol=1e-6)


def test_float32_is_close_to_float64(device):
    rng = np.random.default_rng(4)
    logits, targets = 4 * rng.standard_normal((5, 6)), to_device(rng.integers(0, 6, 5), device)
    out64 = F.cross_entropy(leaf(logits, device), targets)
    out32 = F.cross_entropy(leaf(logits, device, dtype="float32"), targets)
    assert out32.dtype == np.float32
    assert out32.item() == pytest.approx(out64.item(), rel=1e-6)


def test_custom_ignore_index_and_integer_types(device):
    logits = leaf(np.random.default_rng(5).standard_normal((3, 4)), device)
    targets = np.array([1, -1, 3], dtype=np.int32)
    out = F.cross_entropy(logits, to_device(targets, device), ignore_index=-1, reduction="none")
    expected = cross_entropy_reference(host(logits), targets, ignore_index=-1, reduction="none")
    np.testing.assert_allclose(host(out), expected, rtol=1e-12)
    as_list = F.cross_entropy(leaf(np.zeros((2, 4)), "cpu"), [0, 3])
    assert as_list.item() == pytest.approx(math.log(4))


def test_cross_entropy_rejects_bad_input(device):
    logits = leaf(np.zeros((3, 4)), device)
    good = to_device(np.array([0, 1, 2]), device)
    with pytest.raises(TypeError, match=r"targets must hold integers, got a float64"):
        F.cross_entropy(logits, to_device(np.array([0.0, 1.0, 2.0]), device))
    with pytest.raises(TypeError, match=r"targets must be an integer array"):
        F.cross_entropy(logits, leaf([0.0, 1.0, 2.0], device))
    with pytest.raises(IndexError, match=r"targets holds 4; every entry must lie in \[0, 4\) or equal ignore_index"):
        F.cross_entropy(logits, to_device(np.array([0, 4, 1]), device))
    with pytest.raises(IndexError, match=r"targets holds -1"):
        F.cross_entropy(logits, to_device(np.array([0, -1, 1]), device))
    with pytest.raises(ValueError, match=r"targets has shape \(2,\) but logits of shape \(3, 4\)"):
        F.cross_entropy(logits, to_device(np.array([0, 1]), device))
    with pytest.raises(TypeError, match=r"logits must be a Tensor"):
        F.cross_entropy(np.zeros((3, 4), dtype=np.int64), good)
    with pytest.raises(TypeError, match=r"logits must be a floating Tensor"):
        F.cross_entropy(logits > 0, good)
    with pytest.raises(ValueError, match=r"reduction='avg'"):
        F.cross_entropy(logits, good, reduction="avg")
    with pytest.raises(TypeError, match=r"ignore_index=1\.5"):
        F.cross_entropy(logits, good, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., C\)"):
        F.cross_entropy(leaf(np.zeros((3, 0)), device), good)


# ----- mse_loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_matches_numpy_and_gradchecks(device, reduction):
    rng = np.random.default_rng(6)
    prediction, target = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    squared = (prediction - target) ** 2
    expected = {"mean": squared.mean(), "sum": squared.sum(), "none": squared}[reduction]
    out = F.mse_loss(leaf(prediction, device), leaf(target, device), reduction=reduction)
    np.testing.assert_allclose(host(out), expected, rtol=1e-13)
    a, b = leaf(prediction, device), leaf(target, device)
    assert tm.gradcheck(lambda x, y: F.mse_loss(x, y, reduction=reduction), [a, b])


def test_mse_loss_matches_torch_and_target_may_be_constant(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    prediction, target = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    ours = leaf(prediction, device)
    F.mse_loss(ours, leaf(target, device, requires_grad=False)).backward()
    theirs = torch.tensor(prediction, requires_grad=True)
    torch.nn.functional.mse_loss(theirs, torch.tensor(target)).backward()
    np.testing.assert_allclose(host(ours.grad), theirs.grad.numpy(), rtol=1e-12)


def test_mse_loss_float32_is_close_to_float64(device):
    rng = np.random.default_rng(8)
    prediction, target = rng.standard_normal(10), rng.standard_normal(10)
    out32 = F.mse_loss(leaf(prediction, device, dtype="float32"), leaf(target, device, dtype="float32"))
    assert out32.dtype == np.float32
    assert out32.item() == pytest.approx(F.mse_loss(leaf(prediction, device), leaf(target, device)).item(), rel=1e-6)


def test_mse_loss_rejects_bad_input(device):
    a = leaf(np.zeros((2, 3)), device)
    with pytest.raises(ValueError, match=r"target has shape \(3,\) but input has shape \(2, 3\)"):
        F.mse_loss(a, leaf(np.zeros(3), device))
    with pytest.raises(TypeError, match=r"target must be a Tensor"):
        F.mse_loss(a, np.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"target is float32 but input is float64"):
        F.mse_loss(a, leaf(np.zeros((2, 3)), device, dtype="float32"))
    with pytest.raises(ValueError, match=r"reduction='max'"):
        F.mse_loss(a, a, reduction="max")
