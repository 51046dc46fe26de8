"""clip_grad_norm: ‖g‖ = sqrt(Σ over every gradient of Σ g²); scale all by max_norm/‖g‖ only when ‖g‖ > max_norm;
return ‖g‖ before clipping; leave everything alone when ‖g‖ is inf or nan."""
import math

import numpy as np
import pytest

from tinymoe.nn.module import Parameter
from tinymoe.optim import clip_grad_norm


def parameters_with(*grads):
    parameters = []
    for grad in grads:
        parameter = Parameter(np.zeros(np.shape(grad) if grad is not None else (2,)))
        parameter.grad = None if grad is None else np.array(grad, dtype=np.float64)
        parameters.append(parameter)
    return parameters


def global_norm(grads):
    return math.sqrt(sum(float(x) ** 2 for grad in grads for x in np.ravel(grad)))


def test_returns_the_global_norm_and_scales_down_to_max_norm():
    grads = [np.array([[3.0, -4.0], [1.0, 2.0]]), np.array([12.0, -0.5, 7.0])]
    parameters = parameters_with(*grads)
    before = global_norm(grads)
    returned = clip_grad_norm(parameters, max_norm=2.0)
    assert returned == pytest.approx(before, rel=1e-12)
    after = [parameter.grad for parameter in parameters]
    assert global_norm(after) == pytest.approx(2.0, rel=1e-9)
    for original, clipped in zip(grads, after):  # one common factor: directions kept
        np.testing.assert_allclose(clipped, original * (2.0 / before), rtol=1e-9)


@pytest.mark.parametrize("max_norm", [100.0, 13.0])
def test_does_not_scale_at_or_below_max_norm(max_norm):
    grads = [np.array([3.0, 4.0]), np.array([12.0])]  # norm exactly 13
    parameters = parameters_with(*grads)
    assert clip_grad_norm(parameters, max_norm) == pytest.approx(13.0)
    for original, parameter in zip(grads, parameters):
        np.testing.assert_array_equal(parameter.grad, original)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_norm_is_returned_and_nothing_is_scaled(bad):
    grads = [np.array([1e3, 2e3]), np.array([bad, 1.0])]
    parameters = parameters_with(*grads)
    returned = clip_grad_norm(parameters, max_norm=1.0)
    assert not math.isfinite(returned)
    if math.isnan(bad):
        assert math.isnan(returned)
    else:
        assert returned == math.inf
    np.testing.assert_array_equal(parameters[0].grad, grads[0])
    np.testing.assert_array_equal(parameters[1].grad, grads[1])


def test_parameters_without_gradients_are_skipped():
    parameters = parameters_with(None, np.array([6.0, 8.0]), None)
    assert clip_grad_norm(parameters, 5.0) == pytest.approx(10.0)
    np.testing.assert_allclose(parameters[1].grad, [3.0, 4.0], rtol=1e-9)
    assert parameters[0].grad is None and parameters[2].grad is None
    assert clip_grad_norm(parameters_with(None, None), 1.0) == 0.0


def test_large_float32_gradients_are_clipped_not_treated_as_overflow():
    """Σg² of 1e20 overflows float32; the norm must still come out finite (accumulate in float64)."""
    parameter = Parameter(np.zeros(4, dtype=np.float32))
    parameter.grad = np.full(4, 1e20, dtype=np.float32)
    returned = clip_grad_norm([parameter], 1.0)
    assert returned == pytest.approx(2e20, rel=1e-6)
    assert parameter.grad.dtype == np.float32
    np.testing.assert_allclose(parameter.grad, np.full(4, 0.5), rtol=1e-5)


def test_accepts_a_generator_of_parameters():
    parameters = parameters_with(np.array([30.0, 40.0]))
    assert clip_grad_norm(iter(parameters), 5.0) == pytest.approx(50.0)
    np.testing.assert_allclose(parameters[0].grad, [3.0, 4.0], rtol=1e-9)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.nan, "1.0"])
def test_bad_max_norm_raises(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(parameters_with(np.ones(2)), max_norm)
