"""engine/checks.py: the shared argument checks, each accepting what it promises and refusing the rest with a
message that names the op, the argument and its value."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.engine.checks import (normalize_axes, normalize_axis, normalize_permutation, require_bool,
                                   require_number)


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (np.True_, True), (np.False_, False)])
def test_require_bool_accepts_bools_as_python_bools(value, expected):
    result = require_bool(value, "causal", "attention")
    assert result is expected


@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0, np.array(True), [True]])
def test_require_bool_refuses_everything_else(value):
    with pytest.raises(TypeError) as info:
        require_bool(value, "causal", "attention")
    assert str(info.value).startswith(f"attention: causal={value!r} must be a bool")


@pytest.mark.parametrize("value", [0.5, 3, np.float32(0.25), np.int64(2), -1e300])
def test_require_number_returns_a_python_float(value):
    result = require_number(value, "eps", "rms_norm")
    assert type(result) is float and result == float(value)


@pytest.mark.parametrize("value", [True, False, np.True_, "1.0", None, 1 + 0j, [1.0]])
def test_require_number_refuses_non_numbers_and_bools(value):
    with pytest.raises(TypeError, match=r"rms_norm: eps=.* must be a finite real number"):
        require_number(value, "eps", "rms_norm")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan")])
def test_require_number_refuses_nan_and_inf_by_default(value):
    with pytest.raises(TypeError, match=r"rms_norm: eps=(nan|inf|-inf) must be a finite real number"):
        require_number(value, "eps", "rms_norm")


def test_require_number_with_finite_false_lets_inf_and_nan_through_unless_bounded():
    assert require_number(-math.inf, "fill", "where", finite=False) == -math.inf
    assert math.isnan(require_number(math.nan, "fill", "where", finite=False))
    assert require_number(math.inf, "high", "clip", low=0.0, finite=False) == math.inf
    with pytest.raises(ValueError, match=r"clip: high=nan must be >= 0.0"):
        require_number(math.nan, "high", "clip", low=0.0, finite=False)
    with pytest.raises(TypeError, match=r"where: fill=True must be a real number"):
        require_number(True, "fill", "where", finite=False)


@pytest.mark.parametrize("value, low, high, expected", [(-0.1, 0.0, 1.0, "in [0.0, 1.0]"),
                                                         (1.5, 0.0, 1.0, "in [0.0, 1.0]"),
                                                         (-1, 0.0, None, ">= 0.0"), (2, None, 1.0, "<= 1.0")])
def test_require_number_bounds(value, low, high, expected):
    with pytest.raises(ValueError) as info:
        require_number(value, "p", "dropout", low=low, high=high)
    assert str(info.value) == f"dropout: p={float(value)!r} must be {expected}"


@pytest.mark.parametrize("axis, ndim, expected", [(0, 3, 0), (-1, 3, 2), (np.int64(1), 2, 1), (-3, 3, 0)])
def test_normalize_axis(axis, ndim, expected):
    assert normalize_axis(axis, ndim, "softmax") == expected


@pytest.mark.parametrize("axis, error", [(3, ValueError), (-4, ValueError), (1.0, TypeError), (True, TypeError),
                                         (None, TypeError)])
def test_normalize_axis_errors(axis, error):
    with pytest.raises(error, match=rf"softmax: axis={axis!r}"):
        normalize_axis(axis, 3, "softmax")


@pytest.mark.parametrize("axis, expected", [(None, (0, 1, 2)), (1, (1,)), (-1, (2,)), ((2, 0), (0, 2)),
                                            ([-1, 0], (0, 2)), (np.int64(0), (0,)), ((), ())])
def test_normalize_axes(axis, expected):
    assert normalize_axes(axis, 3, "sum") == expected


@pytest.mark.parametrize("axis, error, text", [(3, ValueError, "out of range"), ((0, 3), ValueError, "out of range"),
                                               ((0, -3), ValueError, "repeats an axis"),
                                               ((0, 1.0), TypeError, "must hold ints"),
                                               (1.0, TypeError, "None, an int or a tuple"),
                                               (True, TypeError, "None, an int or a tuple")])
def test_normalize_axes_errors(axis, error, text):
    with pytest.raises(error) as info:
        normalize_axes(axis, 3, "sum")
    assert str(info.value).startswith(f"sum: axis={axis!r}") and text in str(info.value)


def test_normalize_permutation():
    assert normalize_permutation((2, 0, 1), 3, "transpose") == (2, 0, 1)
    assert normalize_permutation((-1, 0, 1), 3, "transpose") == (2, 0, 1)
    assert normalize_permutation([np.int64(1), 0], 2, "transpose") == (1, 0)
    for bad in [(0, 0, 1), (0, 1), (0, 1, 5), (0, 1.0, 2), (True, 0, 2)]:
        with pytest.raises(ValueError, match=r"transpose: axes=.* is not a permutation of the 3 axes"):
            normalize_permutation(bad, 3, "transpose")


def test_tensor_reductions_and_transpose_use_the_shared_axis_checks():
    x = tm.tensor(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"sum: axis=1.5"):
        x.sum(axis=1.5)
    with pytest.raises(ValueError, match=r"max: axis=\(0, -2\) repeats an axis"):
        x.max(axis=(0, -2))
    with pytest.raises(ValueError, match=r"transpose: axes=\(0, 0\) is not a permutation"):
        x.transpose(0, 0)
