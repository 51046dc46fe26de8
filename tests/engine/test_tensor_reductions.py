"""Tensor reductions (sum, mean, max) and shape methods (reshape, transpose, T): forward against NumPy,
backward by gradcheck, torch and by hand; axis errors."""
import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf
from tensor_oracles import tm_grads, torch_grads

# ----- reductions --------------------------------------------------------------------------------------------
REDUCTION_AXES = [None, 0, 1, -1, (0, 2), (-1, 0), (0, 1, 2), [1]]


def _distinct_values(shape, seed=0):
    """Values with no ties and gaps far above gradcheck's eps, so max is differentiable everywhere."""
    rng = np.random.default_rng(seed)
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 + rng.uniform(-0.01, 0.01, shape)


@pytest.mark.parametrize("method", ["sum", "mean", "max"])
@pytest.mark.parametrize("axis", REDUCTION_AXES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduction_forward_matches_numpy(method, axis, keepdims):
    x = _distinct_values((2, 3, 4))
    numpy_axis = tuple(axis) if isinstance(axis, list) else axis
    expected = getattr(np, method)(x, axis=numpy_axis, keepdims=keepdims)
    out = getattr(tm.tensor(x, dtype="float64"), method)(axis=axis, keepdims=keepdims)
    assert out.shape == np.shape(expected)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    assert getattr(tm.tensor(x, dtype="float32"), method)(axis=axis, keepdims=keepdims).dtype == np.float32


@pytest.mark.parametrize("method", ["sum", "mean", "max"])
@pytest.mark.parametrize("axis", REDUCTION_AXES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduction_gradcheck(device, method, axis, keepdims):
    x = _distinct_values((2, 3, 4), seed=1)
    assert tm.gradcheck(lambda t: getattr(t, method)(axis=axis, keepdims=keepdims), [leaf(x, device)])


@pytest.mark.parametrize("method, torch_name", [("sum", "sum"), ("mean", "mean"), ("max", "amax")])
@pytest.mark.parametrize("axis", [None, 1, (0, 2)], ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduction_gradient_matches_torch(method, torch_name, axis, keepdims):
    x = _distinct_values((2, 3, 4), seed=2)
    expected_shape = np.sum(x, axis=axis, keepdims=keepdims).shape
    cotangent = np.random.default_rng(3).standard_normal(expected_shape)
    torch_dims = tuple(range(3)) if axis is None else axis

    def torch_fn(t):
        return getattr(t, torch_name)(dim=torch_dims, keepdim=keepdims)

    (want,) = torch_grads(torch_fn, [x], cotangent)
    (got,) = tm_grads(lambda t: getattr(t, method)(axis=axis, keepdims=keepdims), [x], cotangent)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_reduction_gradients_by_hand():
    x = leaf(np.arange(6.0).reshape(2, 3))
    x.sum(axis=0).backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(x.grad, [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    x = leaf(np.arange(6.0).reshape(2, 3))
    x.mean(axis=1).backward(np.array([3.0, 6.0]))
    np.testing.assert_array_equal(x.grad, [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    x = leaf([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]])
    x.max(axis=1).backward(np.array([10.0, 20.0]))
    np.testing.assert_array_equal(x.grad, [[0.0, 10.0, 0.0], [20.0, 0.0, 0.0]])


def test_reduction_of_scalar_and_full_reduction_shapes():
    s = leaf(4.0)
    for method in ("sum", "mean", "max"):
        out = getattr(s, method)()
        assert out.shape == () and out.item() == 4.0
    x = leaf(np.ones((2, 3)))
    assert x.sum().shape == () and x.mean(keepdims=True).shape == (1, 1)
    assert x.max(axis=None, keepdims=True).shape == (1, 1)


def test_max_ties_send_the_whole_gradient_to_the_maxima():
    x = leaf([1.0, 3.0, 3.0, 2.0])
    x.max().backward(np.array(6.0))
    grad = x.grad
    assert grad[0] == 0.0 and grad[3] == 0.0          # nothing to non-maxima
    assert grad.sum() == pytest.approx(6.0)            # the whole gradient is handed on
    np.testing.assert_array_equal(grad, [0.0, 3.0, 3.0, 0.0])  # split equally (documented in Max)


def test_max_ties_per_row():
    x = leaf([[2.0, 2.0, 2.0], [1.0, 4.0, 4.0]])
    x.max(axis=1).backward(np.array([3.0, 1.0]))
    np.testing.assert_allclose(x.grad, [[1.0, 1.0, 1.0], [0.0, 0.5, 0.5]])


def test_sum_of_empty_is_zero_and_mean_or_max_of_empty_is_an_error():
    empty = tm.tensor(np.zeros((0, 3)), dtype="float64")
    np.testing.assert_array_equal(empty.sum(axis=0).numpy(), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        empty.mean(axis=0)
    with pytest.raises(ValueError, match="empty"):
        empty.max()


@pytest.mark.parametrize("method", ["sum", "mean", "max"])
@pytest.mark.parametrize("axis", [3, -4, (0, 3), 10])
def test_reduction_axis_out_of_range_is_a_clear_error(method, axis):
    t = tm.tensor(np.ones((2, 3, 4)))
    with pytest.raises(ValueError) as info:
        getattr(t, method)(axis=axis)
    message = str(info.value)
    assert "axis" in message and str(axis) in message and "3" in message


@pytest.mark.parametrize("method", ["sum", "mean", "max"])
def test_reduction_repeated_axis_is_an_error(method):
    with pytest.raises(ValueError, match="axis"):
        getattr(tm.tensor(np.ones((2, 3))), method)(axis=(0, 0))
    with pytest.raises(ValueError, match="axis"):
        getattr(tm.tensor(np.ones((2, 3))), method)(axis=(1, -1))


def test_reduction_accepts_numpy_integer_axis():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(tm.tensor(x).sum(axis=np.int64(1)).numpy(), x.sum(axis=1))


# ----- reshape and transpose ---------------------------------------------------------------------------------
RESHAPES = [((6, 4),), ((24,),), ((-1,),), ((4, -1, 2),), (2, 12), (24,), ([3, 8],), (1, 24, 1)]


@pytest.mark.parametrize("args", RESHAPES, ids=str)
def test_reshape_forward_and_gradcheck(device, args):
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    target = args[0] if len(args) == 1 else args
    out = leaf(x, device).reshape(*args)
    np.testing.assert_array_equal(host(out), x.reshape(target))
    assert tm.gradcheck(lambda t: t.reshape(*args), [leaf(x, device)])


def test_reshape_gradient_by_hand():
    x = leaf(np.zeros((2, 3)))
    x.reshape(3, 2).backward(np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(x.grad, np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("bad", [(5, 5), (7, -1), (-1, -1)])
def test_reshape_to_impossible_shape_names_both_shapes(bad):
    with pytest.raises(ValueError) as info:
        tm.tensor(np.ones((2, 3, 4))).reshape(*bad)
    message = str(info.value)
    assert "(2, 3, 4)" in message and str(bad) in message


TRANSPOSES = [(), ((1, 0, 2),), (2, 0, 1), ((0, 1, 2),), (-1, 0, 1)]


@pytest.mark.parametrize("axes", TRANSPOSES, ids=str)
def test_transpose_forward_and_gradcheck(device, axes):
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    numpy_axes = None if not axes else (axes[0] if len(axes) == 1 else axes)
    out = leaf(x, device).transpose(*axes)
    np.testing.assert_array_equal(host(out), np.transpose(x, numpy_axes))
    assert tm.gradcheck(lambda t: t.transpose(*axes), [leaf(x, device)])


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 3, 4)])
def test_T_reverses_axes_like_numpy(device, shape):
    x = np.random.default_rng(1).standard_normal(shape)
    out = leaf(x, device).T
    np.testing.assert_array_equal(host(out), x.T)
    assert tm.gradcheck(lambda t: t.T, [leaf(x, device)])


def test_transpose_gradient_by_hand_for_non_involutive_permutation():
    # (2, 0, 1) is not its own inverse: a wrong inverse permutation in backward shows here
    x = leaf(np.zeros((2, 3, 4)))
    g = np.arange(24.0).reshape(4, 2, 3)
    x.transpose(2, 0, 1).backward(g)
    np.testing.assert_array_equal(x.grad, np.transpose(g, (1, 2, 0)))


@pytest.mark.parametrize("bad", [(0, 0, 1), (0, 1), (0, 1, 2, 3), (0, 1, 5)])
def test_transpose_bad_axes_is_an_error(bad):
    with pytest.raises(ValueError) as info:
        tm.tensor(np.ones((2, 3, 4))).transpose(*bad)
    assert "axes" in str(info.value) or "axis" in str(info.value)
