"""What tm.tensor, tm.Tensor and the constructors (zeros, ones, randn, rand) accept, and the clear errors for the
rest: strings, complex numbers, None and objects, ragged lists, values that overflow the dtype, non-bool flags."""
import numpy as np
import pytest

import tinymoe as tm

BAD_DATA = [
    pytest.param(["1.5", "2"], TypeError, "strings", id="list-of-strings"),
    pytest.param("1.5", TypeError, "string", id="a-string"),
    pytest.param(np.array(["1.5", "2"]), TypeError, "strings", id="string-array"),
    pytest.param([b"1"], TypeError, "bytes", id="bytes"),
    pytest.param([1.0, "a"], TypeError, "strings", id="number-and-string"),
    pytest.param(1 + 2j, TypeError, "complex", id="complex-scalar"),
    pytest.param(np.array([1 + 0j, 2]), TypeError, "complex", id="complex-array"),
    pytest.param(None, TypeError, "None", id="None"),
    pytest.param([1.0, None], TypeError, "None", id="None-in-a-list"),
    pytest.param(np.array([1.0, object()], dtype=object), TypeError, "object", id="object-array"),
    pytest.param({"a": 1}, TypeError, "dict", id="dict"),
    pytest.param([[1.0, 2.0], [3.0]], TypeError, "rectangular", id="ragged"),
    pytest.param(np.array(["2020-01-01"], dtype="datetime64[D]"), TypeError, "datetimes", id="datetime"),
]


@pytest.mark.parametrize("data, error, what", BAD_DATA)
def test_non_numbers_are_refused_naming_data(data, error, what):
    with pytest.raises(error) as info:
        tm.tensor(data)
    message = str(info.value)
    assert "tensor: data" in message and what in message


OVERFLOWS = [
    pytest.param([1e300], "float32", "1e+300", id="python-float"),
    pytest.param(np.array([1.0, -1e39]), "float32", "-1e+39", id="float64-array"),
    pytest.param(np.float64(3.5e38), "float32", "3.5e+38", id="numpy-scalar"),
    pytest.param([[0.0, 1.0], [2.0, -3.4e300]], "float32", "-3.4e+300", id="nested-list"),
]


@pytest.mark.parametrize("data, dtype, value", OVERFLOWS)
def test_a_finite_value_that_overflows_the_dtype_is_an_error_not_inf(data, dtype, value):
    with pytest.raises(OverflowError) as info:
        tm.tensor(data, dtype=dtype)
    message = str(info.value)
    assert f"dtype={dtype}" in message and value in message and "float64" in message


def test_inf_and_nan_given_by_the_user_stay():
    t = tm.tensor([np.inf, -np.inf, np.nan, 1e300], dtype="float64").astype("float64")
    assert np.isposinf(t.numpy()[0]) and np.isneginf(t.numpy()[1]) and np.isnan(t.numpy()[2])
    narrowed = tm.tensor(np.array([np.inf, -np.inf, np.nan, 3.0e38]), dtype="float32").numpy()
    assert np.isposinf(narrowed[0]) and np.isneginf(narrowed[1]) and np.isnan(narrowed[2])
    assert narrowed[3] == np.float32(3.0e38)


def test_what_is_accepted_keeps_its_values():
    assert tm.tensor([True, False]).numpy().tolist() == [1.0, 0.0]
    assert tm.tensor(np.array([1, 2], dtype=np.int64)).dtype == np.float32
    big = tm.tensor([2**70])  # beyond int64: an object array of Python ints, converted exactly through float64
    assert big.numpy()[0] == np.float32(2.0**70)
    assert tm.tensor(np.random.default_rng(0).standard_normal(3)).dtype == np.float64  # float64 stays float64
    assert tm.tensor([np.float32(1.5), 2]).dtype == np.float32


FLAGS = [pytest.param("yes", id="string"), pytest.param(1, id="int-1"), pytest.param(None, id="None"),
         pytest.param(0.0, id="float")]
MAKERS = [
    pytest.param(lambda flag: tm.tensor([1.0], requires_grad=flag), "tensor", id="tensor"),
    pytest.param(lambda flag: tm.Tensor(np.ones(2), requires_grad=flag), "Tensor", id="Tensor"),
    pytest.param(lambda flag: tm.zeros(2, requires_grad=flag), "zeros", id="zeros"),
    pytest.param(lambda flag: tm.ones(2, requires_grad=flag), "ones", id="ones"),
    pytest.param(lambda flag: tm.randn(2, requires_grad=flag), "randn", id="randn"),
    pytest.param(lambda flag: tm.rand(2, requires_grad=flag), "rand", id="rand"),
]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("make, op", MAKERS)
def test_requires_grad_must_be_a_bool(make, op, flag):
    with pytest.raises(TypeError) as info:
        make(flag)
    assert str(info.value).startswith(f"{op}: requires_grad={flag!r} must be a bool")


@pytest.mark.parametrize("make, op", MAKERS)
def test_numpy_bools_are_bools(make, op):
    assert make(np.True_).requires_grad is True
    assert make(np.False_).requires_grad is False


def test_the_internal_constructor_wants_an_array():
    with pytest.raises(TypeError, match=r"Tensor\(data\): data must be a NumPy or CuPy array, got list"):
        tm.Tensor([1.0, 2.0])


@pytest.mark.parametrize("bad", [(True, 2), (2, -1), (np.float64(2.0),)])
def test_constructor_sizes_must_be_non_negative_ints(bad):
    with pytest.raises(ValueError, match=r"zeros: shape=.* every size must be a non-negative int"):
        tm.zeros(*bad)


def test_numpy_integer_sizes_are_accepted():
    assert tm.zeros(np.int64(2), 3).shape == (2, 3)
    assert tm.ones((np.int32(4),)).shape == (4,)
