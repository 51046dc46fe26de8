"""Tensor: the constructor, conversions, and every operator and method — forward against NumPy, backward
against finite differences (gradcheck, float64) and, where torch is installed, against torch's autograd."""
import operator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import tinymoe as tm
from helpers import host, leaf

# ----- shared helpers ------------------------------------------------------------------------------------------

BINARY_OPS = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "pow": operator.pow,
}


def binary_operands(name, a_shape, b_shape, seed=0):
    """float64 operands where the op and its gradient are smooth: positive base for pow, |b| >= 0.5 for div."""
    rng = np.random.default_rng(seed)
    if name == "pow":
        return rng.uniform(0.5, 2.0, a_shape), rng.uniform(-2.0, 2.0, b_shape)
    a = rng.standard_normal(a_shape)
    if name == "div":
        return a, rng.choice([-1.0, 1.0], b_shape) * rng.uniform(0.5, 2.0, b_shape)
    return a, rng.standard_normal(b_shape)


def torch_grads(fn, arrays, cotangent):
    """Gradients of <cotangent, fn(*arrays)> computed by torch in float64 (an independent oracle)."""
    torch = pytest.importorskip("torch")
    leaves = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in arrays]
    out = fn(*leaves)
    out.backward(torch.tensor(np.asarray(cotangent, dtype=np.float64)))
    return [t.grad.numpy() for t in leaves]


def tm_grads(fn, arrays, cotangent, device="cpu"):
    leaves = [leaf(a, device=device) for a in arrays]
    out = fn(*leaves)
    out.backward(tm.tensor(cotangent, dtype="float64", device=device))
    return [host(t.grad) for t in leaves]


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


# ----- binary operators: forward -----------------------------------------------------------------------------
BROADCAST_CASES = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((4,), (3, 4)),
    ((3, 1), (1, 4)),        # both operands broadcast
    ((2, 1, 4), (3, 1)),     # both broadcast, different ranks
    ((), (3, 2)),            # 0-d on the left
    ((3, 2), ()),            # 0-d on the right
    ((1,), (5,)),
    ((2, 3, 1, 5), (4, 1)),
]


@pytest.mark.parametrize("a_shape, b_shape", BROADCAST_CASES)
@pytest.mark.parametrize("name", list(BINARY_OPS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_binary_forward_matches_numpy(name, a_shape, b_shape, dtype):
    op = BINARY_OPS[name]
    a, b = binary_operands(name, a_shape, b_shape)
    out = op(tm.tensor(a, dtype=dtype), tm.tensor(b, dtype=dtype))
    expected = op(a.astype(dtype), b.astype(dtype))
    assert out.shape == expected.shape and out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6 if dtype == "float32" else 1e-12)


# ----- binary operators: backward ----------------------------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", BROADCAST_CASES)
@pytest.mark.parametrize("name", list(BINARY_OPS))
def test_binary_gradcheck(device, name, a_shape, b_shape):
    a, b = binary_operands(name, a_shape, b_shape, seed=1)
    assert tm.gradcheck(BINARY_OPS[name], [leaf(a, device), leaf(b, device)])


@pytest.mark.parametrize("a_shape, b_shape", BROADCAST_CASES)
@pytest.mark.parametrize("name", list(BINARY_OPS))
def test_binary_gradients_match_torch(name, a_shape, b_shape):
    op = BINARY_OPS[name]
    a, b = binary_operands(name, a_shape, b_shape, seed=2)
    cotangent = np.random.default_rng(3).standard_normal(np.broadcast_shapes(a_shape, b_shape))
    expected = torch_grads(op, [a, b], cotangent)
    actual = tm_grads(op, [a, b], cotangent)
    for got, want, shape in zip(actual, expected, (a_shape, b_shape)):
        assert got.shape == shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=3),
    name=st.sampled_from(list(BINARY_OPS)),
    seed=st.integers(0, 2**16),
)
def test_binary_broadcasting_property(shapes, name, seed):
    (a_shape, b_shape), out_shape = shapes.input_shapes, shapes.result_shape
    op = BINARY_OPS[name]
    a, b = binary_operands(name, a_shape, b_shape, seed=seed)
    ta, tb = leaf(a), leaf(b)
    out = op(ta, tb)
    assert out.shape == out_shape
    np.testing.assert_allclose(out.numpy(), op(a, b), rtol=1e-12)
    out.backward(np.ones(out_shape))
    assert ta.grad.shape == a_shape and tb.grad.shape == b_shape
    assert tm.gradcheck(op, [leaf(a), leaf(b)])


@settings(max_examples=25, deadline=None)
@given(
    shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, min_side=0, max_side=3),
    name=st.sampled_from(list(BINARY_OPS)),
    seed=st.integers(0, 2**16),
)
def test_binary_broadcasting_matches_torch_property(shapes, name, seed):
    pytest.importorskip("torch")
    (a_shape, b_shape), out_shape = shapes.input_shapes, shapes.result_shape
    op = BINARY_OPS[name]
    a, b = binary_operands(name, a_shape, b_shape, seed=seed)
    cotangent = np.random.default_rng(seed + 1).standard_normal(out_shape)
    for got, want in zip(tm_grads(op, [a, b], cotangent), torch_grads(op, [a, b], cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_both_operands_requiring_grad_get_unbroadcast_sums_by_hand():
    # a: (2, 1), b: (3,) -> out (2, 3); d(sum(a * b))/da = sum(b), d/db = sum(a) per column
    a, b = leaf([[1.0], [2.0]]), leaf([10.0, 20.0, 30.0])
    (a * b).sum().backward()
    np.testing.assert_array_equal(a.grad, [[60.0], [60.0]])
    np.testing.assert_array_equal(b.grad, [3.0, 3.0, 3.0])
    a, b = leaf([[1.0], [2.0]]), leaf([10.0, 20.0, 30.0])
    (a - b).sum().backward()
    np.testing.assert_array_equal(a.grad, [[3.0], [3.0]])
    np.testing.assert_array_equal(b.grad, [-2.0, -2.0, -2.0])


# ----- Python and NumPy scalars on either side ---------------------------------------------------------------
# (expression, derivative); each expression is valid on a Tensor and on a NumPy array alike.
SCALAR_CASES = {
    "t + 2": (lambda t: t + 2, lambda x: np.ones_like(x)),
    "2 + t": (lambda t: 2 + t, lambda x: np.ones_like(x)),
    "t - 2.5": (lambda t: t - 2.5, lambda x: np.ones_like(x)),
    "2.0 - t": (lambda t: 2.0 - t, lambda x: -np.ones_like(x)),
    "t * 3": (lambda t: t * 3, lambda x: 3 * np.ones_like(x)),
    "3.5 * t": (lambda t: 3.5 * t, lambda x: 3.5 * np.ones_like(x)),
    "t / 4.0": (lambda t: t / 4.0, lambda x: np.full_like(x, 0.25)),
    "2.0 / t": (lambda t: 2.0 / t, lambda x: -2.0 / x**2),
    "t ** 3": (lambda t: t**3, lambda x: 3 * x**2),
    "t ** 0.5": (lambda t: t**0.5, lambda x: 0.5 / np.sqrt(x)),
    "t ** -1": (lambda t: t**-1, lambda x: -1.0 / x**2),
    "2 ** t": (lambda t: 2**t, lambda x: np.log(2.0) * 2**x),
    "-t": (lambda t: -t, lambda x: -np.ones_like(x)),
    "np.float64(2) * t": (lambda t: np.float64(2.0) * t, lambda x: 2 * np.ones_like(x)),
    "t - np.float64(1.5)": (lambda t: t - np.float64(1.5), lambda x: np.ones_like(x)),
    "np.float32(3) / t": (lambda t: np.float32(3.0) / t, lambda x: -3.0 / x**2),
}


def _positive_values(shape=(2, 3), seed=0):
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape)


@pytest.mark.parametrize("case", list(SCALAR_CASES))
def test_scalar_operand_keeps_float32(case):
    expression, _ = SCALAR_CASES[case]
    x = _positive_values()
    out = expression(tm.tensor(x, dtype="float32"))
    assert isinstance(out, tm.Tensor)
    assert out.dtype == np.float32, f"{case} gave {out.dtype}"
    np.testing.assert_allclose(out.numpy(), expression(x), rtol=2e-6)


@pytest.mark.parametrize("case", list(SCALAR_CASES))
def test_scalar_operand_gradient(device, case):
    expression, derivative = SCALAR_CASES[case]
    x = _positive_values(seed=1)
    t = leaf(x, device)
    out = expression(t)
    assert out.dtype == np.float64
    cotangent = np.random.default_rng(2).standard_normal(x.shape)
    out.backward(tm.tensor(cotangent, dtype="float64", device=device))
    np.testing.assert_allclose(host(t.grad), derivative(x) * cotangent, rtol=1e-12)
    assert tm.gradcheck(expression, [leaf(x, device)])


@pytest.mark.parametrize("case", ["t * 3", "2.0 - t", "2 ** t", "t ** 3"])
def test_scalar_operand_float32_gradient_is_float32(case):
    expression, derivative = SCALAR_CASES[case]
    x = _positive_values(seed=4)
    t = tm.tensor(x, dtype="float32", requires_grad=True)
    expression(t).sum().backward()
    assert t.grad.dtype == np.float32
    np.testing.assert_allclose(t.grad, derivative(x.astype(np.float32)), rtol=1e-5)


@pytest.mark.parametrize("name", list(BINARY_OPS))
def test_numpy_array_on_either_side(name):
    op = BINARY_OPS[name]
    a, b = binary_operands(name, (2, 3), (3,), seed=5)
    left = op(tm.tensor(a, dtype="float32"), b)
    right = op(a, tm.tensor(b, dtype="float32"))
    for out in (left, right):
        assert isinstance(out, tm.Tensor) and out.dtype == np.float32 and out.shape == (2, 3)
        np.testing.assert_allclose(out.numpy(), op(a, b), rtol=1e-5)


def test_numpy_array_on_the_left_still_gets_gradient():
    x = leaf([1.0, 2.0, 3.0])
    (np.array([4.0, 5.0, 6.0]) * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [4.0, 5.0, 6.0])


def test_mixed_float32_and_float64_promote_and_grads_keep_input_dtypes():
    a = tm.tensor([1.0, 2.0], dtype="float32", requires_grad=True)
    b = tm.tensor([3.0, 4.0], dtype="float64", requires_grad=True)
    out = a * b
    assert out.dtype == np.float64
    out.sum().backward()
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])
    np.testing.assert_array_equal(b.grad, [1.0, 2.0])


def test_pow_zero_exponent_has_zero_gradient_at_zero():
    x = leaf([0.0, 2.0])
    with np.errstate(all="ignore"):
        (x**0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])


def test_pow_integer_exponents_at_zero_are_finite():
    x = leaf([0.0, -1.5, 2.0])
    (x**2 + x**3).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * np.array([0.0, -1.5, 2.0]) + 3 * np.array([0.0, -1.5, 2.0]) ** 2)


# ----- unary minus -------------------------------------------------------------------------------------------
def test_neg_forward_and_gradient(device):
    x = np.random.default_rng(0).standard_normal((3, 2))
    t = leaf(x, device)
    out = -t
    np.testing.assert_array_equal(host(out), -x)
    out.backward(tm.tensor(np.arange(6.0).reshape(3, 2), dtype="float64", device=device))
    np.testing.assert_array_equal(host(t.grad), -np.arange(6.0).reshape(3, 2))
    assert tm.gradcheck(lambda v: -v, [leaf(x, device)])
    assert (-tm.tensor([1.0])).dtype == np.float32


# ----- matmul ------------------------------------------------------------------------------------------------
MATMUL_CASES = [
    pytest.param((3, 4), (4, 5), id="2d@2d"),
    pytest.param((2, 3, 4), (4, 5), id="batch@2d"),
    pytest.param((4, 5), (2, 5, 3), id="2d@batch"),
    pytest.param((2, 1, 3, 4), (5, 4, 2), id="broadcast-batch"),
    pytest.param((4,), (4, 5), id="1d@2d"),
    pytest.param((3, 4), (4,), id="2d@1d"),
    pytest.param((2, 3, 4), (4,), id="batch@1d"),
    pytest.param((4,), (2, 4, 3), id="1d@batch"),
    pytest.param((1, 1), (1, 1), id="1x1"),
    pytest.param((3,), (3,), id="1d@1d"),   # a 0-d result: backward must restore both squeezed axes
]


@pytest.mark.parametrize("a_shape, b_shape", MATMUL_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matmul_forward_matches_numpy(a_shape, b_shape, dtype):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    out = tm.tensor(a, dtype=dtype) @ tm.tensor(b, dtype=dtype)
    expected = a.astype(dtype) @ b.astype(dtype)
    assert out.shape == expected.shape and out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("a_shape, b_shape", MATMUL_CASES)
def test_matmul_gradcheck(device, a_shape, b_shape):
    rng = np.random.default_rng(1)
    assert tm.gradcheck(operator.matmul, [leaf(rng.standard_normal(a_shape), device),
                                          leaf(rng.standard_normal(b_shape), device)])


@pytest.mark.parametrize("a_shape, b_shape", MATMUL_CASES)
def test_matmul_gradients_match_torch(a_shape, b_shape):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    cotangent = rng.standard_normal(np.matmul(a, b).shape)
    for got, want in zip(tm_grads(operator.matmul, [a, b], cotangent),
                         torch_grads(operator.matmul, [a, b], cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_matmul_gradient_by_hand():
    # d(sum(A @ B))/dA = 1 @ B^T: each row of dA is the row sums of B
    a = leaf([[1.0, 2.0], [3.0, 4.0]])
    b = leaf([[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]])
    (a @ b).sum().backward()
    np.testing.assert_array_equal(a.grad, [[18.0, 27.0], [18.0, 27.0]])
    np.testing.assert_array_equal(b.grad, [[4.0, 4.0, 4.0], [6.0, 6.0, 6.0]])


def test_matmul_with_numpy_operand_on_either_side():
    w = np.arange(6.0).reshape(3, 2)
    x = tm.tensor(np.ones((2, 3)), dtype="float32", requires_grad=True)
    out = x @ w
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.numpy(), np.ones((2, 3)) @ w)
    left = w.T @ tm.tensor(np.ones((3, 1)), dtype="float32")
    np.testing.assert_array_equal(left.numpy(), w.T @ np.ones((3, 1)))


# ----- indexing ----------------------------------------------------------------------------------------------
INDEX_CASES = [
    pytest.param((5,), 1, id="int"),
    pytest.param((5,), -1, id="negative-int"),
    pytest.param((5,), np.int64(3), id="numpy-int"),
    pytest.param((4, 5), (1, 2), id="int-pair"),
    pytest.param((4, 5), slice(1, 3), id="slice"),
    pytest.param((6,), slice(None, None, -2), id="negative-step"),
    pytest.param((4, 5), (slice(None), slice(0, None, 2)), id="strided-columns"),
    pytest.param((2, 3, 4), (Ellipsis, 1), id="ellipsis"),
    pytest.param((3, 4), (None, slice(None), 0), id="newaxis"),
    pytest.param((5,), [0, 0, 2, 0], id="repeated-list"),
    pytest.param((4, 3), np.array([3, 1, 3]), id="repeated-rows"),
    pytest.param((4, 3), (np.array([0, 0, 2]), np.array([1, 1, 1])), id="repeated-pairs"),
    pytest.param((4, 3), (slice(1, None), [2, 0, 2]), id="slice-and-repeated"),
    pytest.param((3, 4), (1, [0, 0, 3]), id="int-and-repeated"),
    pytest.param((2, 3), np.array([[True, False, True], [False, True, True]]), id="bool-mask"),
    pytest.param((3, 4), np.array([[0, 0], [2, 0]]), id="2d-index-array"),
]


@pytest.mark.parametrize("shape, index", INDEX_CASES)
def test_getitem_forward_matches_numpy(shape, index):
    x = np.arange(float(np.prod(shape))).reshape(shape)
    out = tm.tensor(x, dtype="float64")[index]
    np.testing.assert_array_equal(out.numpy(), x[index])
    assert out.shape == x[index].shape


@pytest.mark.parametrize("shape, index", INDEX_CASES)
def test_getitem_gradcheck(device, shape, index):
    x = np.random.default_rng(0).standard_normal(shape)
    assert tm.gradcheck(lambda t: t[index], [leaf(x, device)])


def _torch_index(index, shape):
    """The same selection for torch, which has no negative slice steps (they become index arrays)."""
    torch = pytest.importorskip("torch")
    parts = index if isinstance(index, tuple) else (index,)
    converted = []
    for dim, part in enumerate(parts):
        if isinstance(part, slice) and part.step is not None and part.step < 0:
            part = np.arange(shape[dim])[part]  # the cases using this put the slice on a real axis
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(part.copy())
        elif isinstance(part, np.integer):
            part = int(part)
        converted.append(part)
    return tuple(converted) if isinstance(index, tuple) else converted[0]


@pytest.mark.parametrize("shape, index", INDEX_CASES)
def test_getitem_gradient_matches_torch(shape, index):
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    cotangent = rng.standard_normal(x[index].shape)
    torch_index = _torch_index(index, shape)
    (want,) = torch_grads(lambda t: t[torch_index], [x], cotangent)
    (got,) = tm_grads(lambda t: t[index], [x], cotangent)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_getitem_repeated_indices_sum_by_hand():
    x = leaf([10.0, 20.0, 30.0, 40.0])
    x[[0, 0, 2, 0]].backward(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(x.grad, [7.0, 0.0, 3.0, 0.0])
    m = leaf(np.zeros((2, 2)))
    m[np.array([1, 1, 1]), np.array([0, 0, 1])].sum().backward()
    np.testing.assert_array_equal(m.grad, [[0.0, 0.0], [2.0, 1.0]])


def test_getitem_overlapping_slices_accumulate():
    x = leaf(np.arange(5.0))
    (x[1:4] * 2.0).sum().backward(retain_graph=False)
    (x[2:] + x[:3]).sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 3.0, 4.0, 3.0, 1.0])


def test_getitem_with_tensor_mask_passes_gradient_only_to_selected():
    x = leaf([-1.0, 2.0, -3.0, 4.0])
    mask = x > 0
    assert mask.requires_grad is False
    selected = x[mask]
    np.testing.assert_array_equal(selected.numpy(), [2.0, 4.0])
    (selected * selected).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 4.0, 0.0, 8.0])


def test_getitem_keeps_dtype_and_grad_dtype_float32():
    x = tm.tensor(np.arange(6.0).reshape(2, 3), dtype="float32", requires_grad=True)
    out = x[:, [0, 0]]
    assert out.dtype == np.float32
    out.sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])


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


# ----- astype ------------------------------------------------------------------------------------------------
def test_astype_is_differentiable_and_grad_keeps_the_input_dtype():
    x = tm.tensor([1.0, 2.0], dtype="float32", requires_grad=True)
    y = x.astype("float64")
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])
    assert x.astype("float32") is x
