"""embedding, concatenate, stack, where, topk, one_hot: values, gradients, broadcasting, ties, errors."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf
from tinymoe.engine.backend import device_of, to_device

HYPOTHESIS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----- embedding ---------------------------------------------------------------------------------------


def test_embedding_picks_rows_and_sums_gradients_of_repeated_indices(device):
    rng = np.random.default_rng(0)
    weight, indices = rng.standard_normal((5, 3)), np.array([[4, 0, 4], [2, 4, 0]])
    cotangent = rng.standard_normal((2, 3, 3))
    w = leaf(weight, device)
    out = F.embedding(to_device(indices, device), w)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(host(out), np.stack([[weight[i] for i in row] for row in indices]))
    out.backward(cotangent)
    expected = np.zeros_like(weight)
    for position, row in np.ndenumerate(indices):
        expected[row] += cotangent[position]
    np.testing.assert_allclose(host(w.grad), expected, rtol=1e-14)
    assert tm.gradcheck(lambda t: F.embedding(to_device(indices, device), t), [leaf(weight, device)])


def test_embedding_accepts_scalars_lists_and_empty_indices(device):
    w = leaf(np.arange(6.0).reshape(3, 2), device)
    assert F.embedding(to_device(np.array(2), device), w).tolist() == [4.0, 5.0]
    assert F.embedding(to_device(np.zeros((0, 2), dtype=np.int32), device), w).shape == (0, 2, 2)
    assert F.embedding([1, 1], leaf(np.arange(6.0).reshape(3, 2), "cpu")).tolist() == [[2.0, 3.0], [2.0, 3.0]]


def test_embedding_rejects_bad_input(device):
    w = leaf(np.zeros((4, 2)), device)
    with pytest.raises(TypeError, match=r"indices must hold integers, got a float64"):
        F.embedding(to_device(np.array([0.0, 1.0]), device), w)
    with pytest.raises(TypeError, match=r"indices must be an integer array"):
        F.embedding(leaf([0.0], device), w)
    with pytest.raises(IndexError, match=r"indices holds 4; every entry must lie in \[0, 4\)"):
        F.embedding(to_device(np.array([[0, 4]]), device), w)
    with pytest.raises(IndexError, match=r"indices holds -1"):
        F.embedding(to_device(np.array([-1]), device), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(num_embeddings, dim\), got shape \(4,\)"):
        F.embedding(to_device(np.array([0]), device), leaf(np.zeros(4), device))
    with pytest.raises(TypeError, match=r"weight must be a Tensor"):
        F.embedding(np.array([0]), np.zeros((4, 2)))


# ----- concatenate and stack ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate_matches_numpy_and_gradchecks(device, axis):
    rng = np.random.default_rng(1)
    shapes = {0: [(1, 3), (2, 3), (3, 3)], 1: [(2, 1), (2, 4), (2, 2)], -1: [(2, 1), (2, 4), (2, 2)]}[axis]
    arrays = [rng.standard_normal(shape) for shape in shapes]
    tensors = [leaf(a, device) for a in arrays]
    out = F.concatenate(tensors, axis=axis)
    np.testing.assert_array_equal(host(out), np.concatenate(arrays, axis=axis))
    assert tm.gradcheck(lambda *ts: F.concatenate(list(ts), axis=axis), tensors)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_stack_matches_numpy_and_gradchecks(device, axis):
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((2, 3)) for _ in range(3)]
    tensors = [leaf(a, device) for a in arrays]
    out = F.stack(tensors, axis=axis)
    np.testing.assert_array_equal(host(out), np.stack(arrays, axis=axis))
    assert tm.gradcheck(lambda *ts: F.stack(ts, axis=axis), tensors)


def test_concatenate_and_stack_pass_gradients_only_to_their_own_slices(device):
    a, b = leaf(np.zeros((1, 2)), device), leaf(np.zeros((2, 2)), device)
    F.concatenate([a, b]).backward(np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(host(a.grad), [[0.0, 1.0]])
    np.testing.assert_array_equal(host(b.grad), [[2.0, 3.0], [4.0, 5.0]])
    c, d = leaf(np.zeros(2), device), leaf(np.zeros(2), device)
    F.stack([c, d], axis=1).backward(np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(host(c.grad), [1.0, 3.0])
    np.testing.assert_array_equal(host(d.grad), [2.0, 4.0])


def test_concatenate_and_stack_reject_bad_input(device):
    a = leaf(np.zeros((2, 3)), device)
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape \(2, 4\) but tensors\[0\] has shape \(2, 3\)"):
        F.concatenate([a, leaf(np.zeros((2, 4)), device)], axis=0)
    with pytest.raises(ValueError, match=r"axis=2 is out of range"):
        F.concatenate([a, a], axis=2)
    with pytest.raises(TypeError, match=r"tensors must be a non-empty list"):
        F.concatenate([])
    with pytest.raises(TypeError, match=r"tensors must be a non-empty list"):
        F.stack(a)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a Tensor"):
        F.concatenate([a, np.zeros((2, 3))])
    with pytest.raises(TypeError, match=r"tensors\[1\] is float32 but tensors\[0\] is float64"):
        F.stack([a, leaf(np.zeros((2, 3)), device, dtype="float32")])
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape \(3, 2\)"):
        F.stack([a, leaf(np.zeros((3, 2)), device)])
    with pytest.raises(ValueError, match=r"axis=3 is out of range for an input with 3"):
        F.stack([a, a], axis=3)
    with pytest.raises(ValueError, match=r"0-d"):
        F.concatenate([leaf(1.0, device)])


# ----- where -------------------------------------------------------------------------------------------


def test_where_broadcasts_and_unbroadcasts_gradients(device):
    rng = np.random.default_rng(3)
    condition = rng.random((3, 1)) < 0.5
    condition[0, 0], condition[1, 0] = True, False
    a, b = rng.standard_normal((1, 4)), rng.standard_normal((2, 3, 4))
    ta, tb = leaf(a, device), leaf(b, device)
    out = F.where(to_device(condition, device), ta, tb)
    expected = np.array([[[a[0, j] if condition[i, 0] else b[n, i, j] for j in range(4)] for i in range(3)]
                         for n in range(2)])
    np.testing.assert_array_equal(host(out), expected)
    assert tm.gradcheck(lambda x, y: F.where(to_device(condition, device), x, y), [ta, tb])
    ta.grad = tb.grad = None
    out.backward(np.ones((2, 3, 4)))
    np.testing.assert_array_equal(host(ta.grad), np.full((1, 4), 2.0 * condition.sum()))
    np.testing.assert_array_equal(host(tb.grad), np.broadcast_to(~condition, (2, 3, 4)).astype(float))


def test_where_takes_bool_tensors_and_scalars(device):
    x = leaf([-2.0, 0.5, 3.0], device)
    out = F.where(x > 0, x, 0.0)
    np.testing.assert_array_equal(host(out), [0.0, 0.5, 3.0])
    out.backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(host(x.grad), [0.0, 2.0, 3.0])
    assert F.where(np.array([True, False]), -1, leaf([5.0, 6.0], "cpu")).tolist() == [-1.0, 6.0]
    assert F.where(True, leaf([1.0], device, dtype="float32"), 2.0).dtype == np.float32


def test_where_rejects_bad_input(device):
    a = leaf(np.zeros(3), device)
    with pytest.raises(TypeError, match=r"condition must be a bool array or bool Tensor, got a float64"):
        F.where(to_device(np.zeros(3), device), a, a)
    with pytest.raises(TypeError, match=r"at least one of a, b must be a Tensor"):
        F.where(np.array([True]), 1.0, 2.0)
    with pytest.raises(TypeError, match=r"\bb must be a Tensor or a real scalar, got a float64 ndarray"):
        F.where(np.array([True]), a, np.zeros(3))
    with pytest.raises(ValueError, match=r"shapes do not broadcast: condition \(2,\), a \(3,\)"):
        F.where(to_device(np.array([True, False]), device), a, 1.0)
    with pytest.raises(TypeError, match=r"\bb is float32 but a is float64"):
        F.where(to_device(np.array([True]), device), a, leaf([1.0], device, dtype="float32"))


# ----- topk --------------------------------------------------------------------------------------------


def topk_reference(x, k, axis, largest):
    """Sort each 1-D slice in Python by (value, index), best first: ties go to the lower index."""
    moved = np.moveaxis(x, axis, -1)
    indices = np.empty(moved.shape[:-1] + (k,), dtype=np.int64)
    for position in np.ndindex(moved.shape[:-1]):
        row = moved[position]
        order = sorted(range(len(row)), key=lambda i: (-row[i] if largest else row[i], i))
        indices[position] = order[:k]
    values = np.take_along_axis(moved, indices, axis=-1)
    return np.moveaxis(values, -1, axis), np.moveaxis(indices, -1, axis)


@st.composite
def topk_cases(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    k = draw(st.integers(1, shape[axis]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.integers(-2, 3, shape).astype(np.float64)  # few distinct values: many ties
    return x, k, axis, draw(st.booleans())


@given(case=topk_cases())
@HYPOTHESIS
def test_topk_matches_a_python_sort_with_ties_to_the_lower_index(device, case):
    x, k, axis, largest = case
    values, indices = F.topk(leaf(x, device), k, axis=axis, largest=largest)
    expected_values, expected_indices = topk_reference(x, k, axis, largest)
    assert isinstance(values, tm.Tensor) and not isinstance(indices, tm.Tensor)
    assert device_of(indices) == device and indices.dtype.kind == "i"
    np.testing.assert_array_equal(host(values), expected_values)
    np.testing.assert_array_equal(host(indices), expected_indices)


def test_topk_ties_and_order(device):
    values, indices = F.topk(leaf([1.0, 3.0, 3.0, 2.0, 3.0], device), 4)
    assert host(values).tolist() == [3.0, 3.0, 3.0, 2.0] and host(indices).tolist() == [1, 2, 4, 3]
    values, indices = F.topk(leaf([2.0, 1.0, 1.0, 5.0], device), 2, largest=False)
    assert host(values).tolist() == [1.0, 1.0] and host(indices).tolist() == [1, 2]


@pytest.mark.parametrize("axis, k", [(-1, 2), (0, 3), (1, 1)])
def test_topk_gradient_goes_back_to_the_chosen_positions(device, axis, k):
    x = leaf(np.random.default_rng(4).standard_normal((3, 4)), device)
    assert tm.gradcheck(lambda t: F.topk(t, k, axis=axis)[0], [x])
    x.grad = None
    values, indices = F.topk(x, k, axis=axis)
    cotangent = np.random.default_rng(5).standard_normal(values.shape)
    values.backward(cotangent)
    expected = np.zeros((3, 4))
    np.put_along_axis(expected, host(indices), cotangent, axis=axis)
    np.testing.assert_array_equal(host(x.grad), expected)


def test_topk_rejects_bad_input(device):
    x = leaf(np.zeros((2, 3)), device)
    with pytest.raises(ValueError, match=r"k=0 must be in \[1, 3\]"):
        F.topk(x, 0)
    with pytest.raises(ValueError, match=r"k=4 must be in \[1, 3\]"):
        F.topk(x, 4)
    with pytest.raises(ValueError, match=r"k=3 must be in \[1, 2\]"):
        F.topk(x, 3, axis=0)
    with pytest.raises(TypeError, match=r"k=1\.5 must be an int"):
        F.topk(x, 1.5)
    with pytest.raises(ValueError, match=r"axis=2 is out of range"):
        F.topk(x, 1, axis=2)
    with pytest.raises(TypeError, match=r"largest='yes'"):
        F.topk(x, 1, largest="yes")
    with pytest.raises(TypeError, match=r"\bx must be a Tensor"):
        F.topk(np.zeros(3), 1)
    with pytest.raises(ValueError, match=r"x is 0-d"):
        F.topk(leaf(1.0, device), 1)


# ----- one_hot -----------------------------------------------------------------------------------------


def test_one_hot_matches_identity_rows_on_the_indices_device(device):
    indices = np.array([[2, 0], [1, 2]])
    out = F.one_hot(to_device(indices, device), 3)
    assert isinstance(out, tm.Tensor) and out.device == device and out.dtype == np.float32
    assert not out.requires_grad
    np.testing.assert_array_equal(host(out), np.eye(3)[indices])
    assert F.one_hot(to_device(np.array(1), device), 2, dtype="float64").tolist() == [0.0, 1.0]


def test_one_hot_rejects_bad_input(device):
    indices = to_device(np.array([0, 1]), device)
    with pytest.raises(TypeError, match=r"indices must hold integers"):
        F.one_hot(to_device(np.array([0.0]), device), 2)
    with pytest.raises(IndexError, match=r"indices holds 2; every entry must lie in \[0, 2\)"):
        F.one_hot(to_device(np.array([0, 2]), device), 2)
    with pytest.raises(ValueError, match=r"num_classes=0 must be >= 1"):
        F.one_hot(indices, 0)
    with pytest.raises(TypeError, match=r"num_classes=2\.0 must be an int"):
        F.one_hot(indices, 2.0)
    with pytest.raises(TypeError, match=r"one_hot: dtype=int32 is not supported"):
        F.one_hot(indices, 2, dtype="int32")
