"""Tensor: the constructor, attributes, conversions, repr, detach, comparisons and astype."""
import operator

import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf

# ----- the constructor and the basic attributes ----------------------------------------------------------------
def test_tensor_attributes(device):
    t = tm.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=device)
    assert isinstance(t, tm.Tensor)
    assert t.shape == (2, 3) and isinstance(t.shape, tuple)
    assert t.ndim == 2 and t.dtype == np.float32 and t.device == device
    assert t.requires_grad is False and t.grad is None and t.is_leaf
    assert len(t) == 2
    np.testing.assert_array_equal(t.numpy(), [[1, 2, 3], [4, 5, 6]])
    assert isinstance(t.numpy(), np.ndarray)
    assert tm.tensor([1.0], requires_grad=True).requires_grad is True


def test_tensor_copies_its_data():
    source = np.array([1.0, 2.0], dtype=np.float32)
    t = tm.tensor(source)
    source[0] = 100.0
    assert t.numpy()[0] == 1.0
    copy = tm.tensor(t)
    t.data[1] = -5.0
    assert copy.numpy()[1] == 2.0
    assert copy.requires_grad is False


def test_scalar_tensor_and_item():
    t = tm.tensor(2.5, dtype="float64")
    assert t.shape == () and t.ndim == 0
    assert t.item() == 2.5 and isinstance(t.item(), float)
    assert tm.tensor([[7.0]]).item() == 7.0
    with pytest.raises(ValueError, match=r"\(2,\)"):
        tm.tensor([1.0, 2.0]).item()
    with pytest.raises(TypeError):
        len(t)


def test_bool_of_tensors():
    assert bool(tm.tensor([1.0])) and not bool(tm.tensor(0.0))
    with pytest.raises(ValueError, match="ambiguous"):
        bool(tm.tensor([1.0, 2.0]))


def test_repr_shows_values_and_dtype():
    text = repr(tm.tensor([1.5, -2.0], dtype="float64", requires_grad=True))
    assert "1.5" in text and "float64" in text and "requires_grad=True" in text


def test_detach_cuts_the_graph_and_keeps_values():
    x = leaf([1.0, 2.0, 3.0])
    y = x * 2.0
    d = y.detach()
    assert d.requires_grad is False and d.is_leaf
    np.testing.assert_array_equal(d.numpy(), [2.0, 4.0, 6.0])
    (x * d).sum().backward()  # d is a constant: dx = d, not d + 2x
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])


# ----- comparisons -------------------------------------------------------------------------------------------
COMPARISONS = [operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne]


@pytest.mark.parametrize("compare", COMPARISONS, ids=lambda f: f.__name__)
def test_comparisons_match_numpy_and_carry_no_gradient(compare):
    a = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    b = np.array([2.0, 2.0, 2.0])
    ta = leaf(a)
    for other, other_np in ((leaf(b), b), (b, b), (2.0, 2.0)):
        result = compare(ta, other)
        np.testing.assert_array_equal(host(result), compare(a, other_np))
        assert host(result).dtype == np.bool_
        assert not getattr(result, "requires_grad", False)
    # a comparison inside an expression adds nothing to the gradient
    (ta * (ta > 1.5)).sum().backward()
    np.testing.assert_array_equal(ta.grad, (a > 1.5).astype(float))


def test_comparison_result_combined_with_a_float_scalar_keeps_the_values():
    x = tm.tensor([-1.0, 2.0])
    scaled = (x > 0) * 2.0
    shifted = (x > 0) + 0.5
    np.testing.assert_array_equal(host(scaled), [0.0, 2.0])
    np.testing.assert_array_equal(host(shifted), [0.5, 1.5])


def test_tensor_is_hashable_by_identity_despite_elementwise_eq():
    a, b = tm.tensor([1.0]), tm.tensor([1.0])
    assert len({a: 1, b: 2}) == 2


# ----- astype ------------------------------------------------------------------------------------------------
def test_astype_is_differentiable_and_grad_keeps_the_input_dtype():
    x = tm.tensor([1.0, 2.0], dtype="float32", requires_grad=True)
    y = x.astype("float64")
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])
    assert x.astype("float32") is x
