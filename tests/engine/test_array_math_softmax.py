"""array_math.softmax / softmax_backward: against the formula in float64 and the explicit Jacobian; rows of −inf
(NaN as torch, or zeros for attention); and the Functions that use them give exactly these arrays."""
import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F
from tinymoe.engine import array_math


def test_softmax_matches_the_formula_and_stays_finite_for_huge_logits():
    x = np.array([[1.0, 2.0, 3.0], [1e4, -1e4, 0.0]])
    expected_first = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    out = array_math.softmax(x, axis=-1)
    np.testing.assert_allclose(out[0], expected_first, rtol=1e-15)
    np.testing.assert_array_equal(out[1], [1.0, 0.0, 0.0])


def test_rows_of_minus_inf_give_nan_or_zeros_when_asked():
    x = np.array([[-np.inf, -np.inf], [0.0, -np.inf]])
    with np.errstate(invalid="ignore"):
        plain = array_math.softmax(x, axis=-1)
    assert np.isnan(plain[0]).all() and plain[1].tolist() == [1.0, 0.0]
    zeroed = array_math.softmax(x, axis=-1, masked_rows_to_zero=True)
    assert zeroed.tolist() == [[0.0, 0.0], [1.0, 0.0]]


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_backward_is_the_jacobian_transpose_product(axis):
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    y = array_math.softmax(x, axis=axis)
    got = array_math.softmax_backward(y, g, axis=axis)
    moved_y, moved_g = np.moveaxis(y, axis, -1), np.moveaxis(g, axis, -1)
    expected = np.empty_like(moved_y)
    for row in range(moved_y.shape[0]):
        p = moved_y[row]
        jacobian = np.diag(p) - np.outer(p, p)  # d y_i / d x_j
        expected[row] = jacobian.T @ moved_g[row]
    np.testing.assert_allclose(got, np.moveaxis(expected, -1, axis), rtol=1e-12, atol=1e-15)


def test_functional_softmax_and_attention_give_the_array_math_arrays_exactly():
    rng = np.random.default_rng(1)
    logits, cotangent = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    x = tm.tensor(logits, dtype="float64", requires_grad=True)
    y = F.softmax(x, axis=1)
    y.backward(cotangent)
    reference = array_math.softmax(logits, axis=1)
    np.testing.assert_array_equal(y.numpy(), reference)
    np.testing.assert_array_equal(x.grad, array_math.softmax_backward(reference, cotangent, axis=1))

    q, k, v = (rng.standard_normal((3, 4)) for _ in range(3))
    out = F.scaled_dot_product_attention(*(tm.tensor(a, dtype="float64") for a in (q, k, v)), causal=True)
    scores = np.where(np.tril(np.ones((3, 3), bool)), (q @ k.T) * 0.5, -np.inf)
    np.testing.assert_array_equal(out.numpy(), array_math.softmax(scores, -1, masked_rows_to_zero=True) @ v)
