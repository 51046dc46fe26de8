"""erf on raw arrays: our NumPy series / continued fraction against math.erf, to 1e-14 absolute."""
import math

import numpy as np
import pytest

from helpers import host
from tinymoe.engine.backend import to_device
from tinymoe.engine.array_math import erf

math_erf = np.vectorize(math.erf, otypes=[np.float64])


def dense_grid():
    just_below, just_above = np.nextafter(2.5, 0.0), np.nextafter(2.5, 3.0)
    tiny = np.logspace(-300, 0.5, 2000)
    large = np.array([5.9, 6.0, 6.5, 10.0, 27.0, 1e3, 1e10, 1e300])
    positive = np.concatenate([np.linspace(0.0, 8.0, 160_001), tiny, large, [just_below, 2.5, just_above]])
    return np.concatenate([positive, -positive])


def test_erf_matches_math_erf_to_1e_14_on_a_dense_grid_with_tails():
    grid = dense_grid()
    error = np.abs(erf(grid) - math_erf(grid))
    assert error.max() <= 1e-14, f"worst at x={grid[error.argmax()]!r}: {error.max():.3g}"


def test_erf_is_relatively_accurate_for_tiny_arguments():
    tiny = np.logspace(-300, -3, 500)
    np.testing.assert_allclose(erf(tiny), math_erf(tiny), rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "x, expected",
    [(0.0, 0.0), (np.inf, 1.0), (-np.inf, -1.0), (1e300, 1.0), (-1e300, -1.0)],
)
def test_erf_special_values(x, expected):
    assert erf(np.array([x]))[0] == expected


def test_erf_is_odd_and_carries_nan_and_negative_zero():
    x = np.linspace(-7, 7, 10_001)
    np.testing.assert_array_equal(erf(-x), -erf(x))
    out = erf(np.array([np.nan, -0.0]))
    assert np.isnan(out[0]) and out[1] == 0.0 and np.signbit(out[1])


def test_erf_keeps_float32_and_accepts_0d_and_integer_input():
    x32 = np.linspace(-4, 4, 101, dtype=np.float32)
    out32 = erf(x32)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, math_erf(x32.astype(np.float64)), rtol=1e-6, atol=1e-7)
    zero_d = erf(np.array(0.5))
    assert zero_d.shape == () and abs(float(zero_d) - math.erf(0.5)) < 1e-16
    np.testing.assert_allclose(erf(np.array([0, 1, 3])), math_erf(np.array([0.0, 1.0, 3.0])), atol=1e-15)


def test_erf_on_each_device_matches_math_erf(device):
    grid = np.linspace(-6, 6, 4001)
    out = erf(to_device(grid, device))
    assert np.abs(host(out) - math_erf(grid)).max() <= 1e-14
