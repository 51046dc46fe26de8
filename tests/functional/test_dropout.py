"""dropout: the mask a seed gives, inverted scaling, identity cases, gradient, statistics, errors."""
import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf


def expected_mask(seed, shape, p):
    """Kept where a U[0, 1) draw from numpy's default_rng(seed) is >= p, scaled by 1/(1 - p)."""
    draws = np.random.default_rng(seed).uniform(0.0, 1.0, shape)
    return (draws >= p) / (1.0 - p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_a_seed_gives_the_documented_mask_and_gradient(device, p):
    x = np.random.default_rng(0).standard_normal((4, 5)) + 5.0
    t = leaf(x, device)
    out = F.dropout(t, p, generator=123)
    mask = expected_mask(123, x.shape, p)
    np.testing.assert_allclose(host(out), x * mask, rtol=1e-15)
    cotangent = np.random.default_rng(1).standard_normal(x.shape)
    out.backward(cotangent)
    np.testing.assert_allclose(host(t.grad), cotangent * mask, rtol=1e-15)


def test_gradient_matches_finite_differences_with_a_fixed_seed(device):
    x = leaf(np.random.default_rng(2).standard_normal((3, 4)), device)
    assert tm.gradcheck(lambda t: F.dropout(t, 0.4, generator=7), [x])


def test_same_seed_same_mask_across_dtypes_and_other_seeds_differ(device):
    x = np.ones((8, 8))
    first = host(F.dropout(leaf(x, device), 0.5, generator=11))
    np.testing.assert_array_equal(host(F.dropout(leaf(x, device), 0.5, generator=11)), first)
    float32 = host(F.dropout(leaf(x, device, dtype="float32"), 0.5, generator=11))
    np.testing.assert_array_equal(float32 != 0, first != 0)
    assert (host(F.dropout(leaf(x, device), 0.5, generator=12)) != first).any()
    generator = np.random.default_rng(11)
    np.testing.assert_array_equal(host(F.dropout(leaf(x, device), 0.5, generator=generator)), first)


def test_kept_fraction_and_mean_follow_p(device):
    p, size = 0.3, 200_000
    out = host(F.dropout(tm.ones(size, device=device, dtype="float64"), p, generator=5))
    kept_fraction = (out != 0).mean()
    standard_error = np.sqrt(p * (1 - p) / size)
    assert abs(kept_fraction - (1 - p)) < 5 * standard_error
    assert abs(out.mean() - 1.0) < 5 * standard_error / (1 - p)
    np.testing.assert_allclose(out[out != 0], 1.0 / (1.0 - p))


def test_identity_when_not_training_or_p_is_zero(device):
    x = leaf(np.arange(6.0), device)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x


def test_p_one_drops_everything_without_nan(device):
    x = leaf(np.arange(1.0, 7.0), device)
    out = F.dropout(x, 1.0, generator=0)
    np.testing.assert_array_equal(host(out), np.zeros(6))
    out.backward(np.ones(6))
    np.testing.assert_array_equal(host(x.grad), np.zeros(6))


def test_dropout_rejects_bad_input(device):
    x = leaf(np.zeros(3), device)
    with pytest.raises(ValueError, match=r"p=1\.5 must be in \[0\.0, 1\.0\]"):
        F.dropout(x, 1.5)
    with pytest.raises(ValueError, match=r"p=-0\.1 must be in"):
        F.dropout(x, -0.1)
    with pytest.raises(TypeError, match=r"p='half' must be a finite real number"):
        F.dropout(x, "half")
    with pytest.raises(TypeError, match=r"p=nan must be a finite real number"):
        F.dropout(x, float("nan"))
    with pytest.raises(TypeError, match=r"training='yes' must be a bool"):
        F.dropout(x, 0.5, training="yes")
    with pytest.raises(TypeError, match=r"generator='seed'"):
        F.dropout(x, 0.5, generator="seed")
    with pytest.raises(TypeError, match=r"\bx must be a Tensor"):
        F.dropout(np.zeros(3), 0.5)
