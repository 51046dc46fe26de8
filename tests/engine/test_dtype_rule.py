"""The engine's one dtype rule (tensor.py's docstring): Tensors of different floating dtypes never meet silently;
constants (Python numbers, NumPy scalars, plain arrays) take the tensor's dtype; bool masks never widen;
comparisons accept any mix."""
import operator

import numpy as np
import pytest

import tinymoe as tm

OPERATORS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
             "pow": operator.pow, "matmul": operator.matmul}


def pair(first="float32", second="float64"):
    return (tm.tensor([1.0, 2.0], dtype=first, requires_grad=True),
            tm.tensor([3.0, 4.0], dtype=second, requires_grad=True))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_mixed_float_tensors_raise_a_type_error_naming_op_dtypes_and_the_cast(name):
    a, b = pair()
    with pytest.raises(TypeError) as info:
        OPERATORS[name](a, b)
    message = str(info.value)
    assert message.startswith(f"{name}: ") and "float32" in message and "float64" in message
    assert ".astype()" in message


@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_constants_take_the_tensor_dtype(name, dtype):
    x = tm.tensor([1.5, 2.0], dtype=dtype)
    fn = OPERATORS[name]
    constants = [np.array([2.0, 0.5])] if name == "matmul" else [2, 0.5, np.float64(0.5), np.float32(2.0),
                                                                np.array([2.0, 0.5]), np.array([1, 2])]
    for constant in constants:
        for result in (fn(x, constant), fn(constant, x)):
            assert result.dtype == np.dtype(dtype), (name, constant)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_bool_mask_keeps_the_float_dtype_and_values(dtype):
    x = tm.tensor([-1.0, 2.0, 3.0], dtype=dtype, requires_grad=True)
    mask = x > 0
    assert mask.dtype == np.bool_
    for out in (x * mask, mask * x, x + mask):
        assert out.dtype == np.dtype(dtype)
    assert (mask * 2.0).dtype == np.float32  # a mask with a constant: float32, the default dtype
    (x * mask).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 1.0, 1.0])


@pytest.mark.parametrize("name", list(OPERATORS))
def test_a_tensor_holding_integers_is_refused_by_every_operator(name):
    integers = tm.Tensor(np.arange(1, 3))  # only the internal constructor can make one
    x = tm.tensor([1.0, 2.0])
    for left, right in ((integers, x), (x, integers), (integers, 2.0)):
        with pytest.raises(TypeError, match=rf"{name}: a Tensor holding int64 data cannot take part in arithmetic"):
            OPERATORS[name](left, right)


def test_comparisons_accept_mixed_dtypes():
    a, b = pair()
    assert (a < b).numpy().tolist() == [True, True]
    assert (b == b.astype("float32")).numpy().tolist() == [True, True]


def test_same_dtype_tensors_are_unchanged_by_the_rule():
    a, b = pair("float64", "float64")
    out = (a * b + a / b - a**b) @ b
    expected = (np.array([1.0, 2.0]) * [3.0, 4.0] + np.array([1.0, 2.0]) / [3.0, 4.0]
                - np.array([1.0, 2.0]) ** [3.0, 4.0]) @ np.array([3.0, 4.0])
    assert out.dtype == np.float64 and out.item() == expected
