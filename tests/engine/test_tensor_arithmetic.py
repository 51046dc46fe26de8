"""Tensor arithmetic (+ - * / ** unary minus, @): forward against NumPy, backward against finite
differences (gradcheck, float64) and, where torch is installed, against torch's autograd; scalar and NumPy operands."""
import operator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import tinymoe as tm
from helpers import host, leaf
from tensor_oracles import BINARY_OPS, binary_operands, tm_grads, torch_grads

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


@pytest.mark.parametrize("name", [*BINARY_OPS, "matmul"])
def test_float32_with_float64_is_refused_naming_the_op_and_both_dtypes(name):
    # The dtype rule (tensor.py): no silent promotion; the user casts with .astype().
    a = tm.tensor([1.0, 2.0], dtype="float32", requires_grad=True)
    b = tm.tensor([3.0, 4.0], dtype="float64", requires_grad=True)
    fn = operator.matmul if name == "matmul" else BINARY_OPS[name]
    for left, right, first, second in ((a, b, "float32", "float64"), (b, a, "float64", "float32")):
        with pytest.raises(TypeError, match=rf"{name}: a {first} tensor cannot be combined with a {second} tensor"
                                            r".*\.astype\(\)"):
            fn(left, right)
    out = fn(a.astype("float64"), b)  # the cast the message asks for works, and the gradient keeps a's dtype
    out.sum().backward()
    assert out.dtype == np.float64 and a.grad.dtype == np.float32


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
