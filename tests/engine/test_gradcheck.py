"""gradcheck must pass right backwards and catch wrong ones: off by 1%, a missing gradient, one wrong element,
a cotangent ignored; on small inputs element by element and on large ones along random directions."""
import inspect

import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf


def scaled_cube(scale):
    """y = x**3 with a backward multiplied by `scale` (1.0: right)."""

    class ScaledCube(tm.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return scale * 3 * x**2 * grad

    return ScaledCube


class ProductForgettingSecond(tm.Function):
    """a * b whose backward returns None for b."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, None


def wrong_at(flat_index):
    """y = 2x with the gradient's sign flipped at one flat position."""

    class WrongAtOneElement(tm.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            grad_x = 2 * grad
            grad_x.reshape(-1)[flat_index] *= -1
            return grad_x

    return WrongAtOneElement


class IgnoresCotangentShape(tm.Function):
    """y = 3x whose backward uses the mean of the cotangent: right for a uniform cotangent only."""

    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, grad):
        return np.full(grad.shape, 3 * grad.mean())


def values_away_from_zero(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.5, shape)


# ----- the signature -----------------------------------------------------------------------------------------
def test_signature_and_defaults():
    parameters = inspect.signature(tm.gradcheck).parameters
    assert list(parameters)[:6] == ["fn", "inputs", "eps", "atol", "rtol", "raise_exception"]
    assert parameters["eps"].default == 1e-6
    assert parameters["atol"].default == 1e-5
    assert parameters["rtol"].default == 1e-4
    assert parameters["raise_exception"].default is True
    keyword_only = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == ["n_directions", "exact_max_elements", "seed", "discrete", "roundoff", "return_report"]
    assert parameters["discrete"].default is None and parameters["roundoff"].default == 4.0


# ----- right backwards pass ----------------------------------------------------------------------------------
def test_passes_on_correct_composite(device):
    rng = np.random.default_rng(0)
    w, x, b = (leaf(rng.standard_normal(shape), device) for shape in [(4, 3), (5, 4), (3,)])

    def layer(w, x, b):
        hidden = x @ w + b
        return (hidden * hidden).mean(axis=0) / (1.0 + hidden.max())

    assert tm.gradcheck(layer, [w, x, b]) is True


def test_passes_with_non_tensor_arguments_and_tuple_outputs():
    x = leaf(values_away_from_zero((3, 2)))
    assert tm.gradcheck(lambda t, k, axis: (t * k, t.sum(axis=axis)), [x, 2.5, 0]) is True


def test_inputs_without_requires_grad_are_constants_not_checked():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    assert tm.gradcheck(ProductForgettingSecond.apply, [a, b]) is True


def test_fn_may_read_inputs_from_a_closure():
    weight = leaf(values_away_from_zero((3,), seed=1))
    data = tm.tensor(np.array([1.0, 2.0, 3.0]), dtype="float64")
    assert tm.gradcheck(lambda *unused: scaled_cube(1.0).apply(weight) * data, [weight])
    with pytest.raises(tm.GradcheckError):
        tm.gradcheck(lambda *unused: scaled_cube(1.01).apply(weight) * data, [weight])


# ----- wrong backwards are caught ----------------------------------------------------------------------------
def test_catches_backward_off_by_one_percent():
    x = leaf(values_away_from_zero((2, 3)))
    assert tm.gradcheck(scaled_cube(1.0).apply, [x])
    with pytest.raises(tm.GradcheckError) as info:
        tm.gradcheck(scaled_cube(1.01).apply, [x])
    message = str(info.value)
    assert "input 0" in message and "(2, 3)" in message
    assert "analytic" in message and "numeric" in message
    assert tm.gradcheck(scaled_cube(0.99).apply, [x], raise_exception=False) is False


def test_catches_a_missing_gradient_naming_that_input():
    a, b = leaf(values_away_from_zero((3,), seed=2)), leaf(values_away_from_zero((3,), seed=3))
    with pytest.raises(tm.GradcheckError) as info:
        tm.gradcheck(ProductForgettingSecond.apply, [a, b])
    message = str(info.value)
    assert "input 1" in message and "no gradient" in message
    assert "input 0" not in message                    # the first input's gradient is right
    assert tm.gradcheck(ProductForgettingSecond.apply, [a, b], raise_exception=False) is False


def test_names_the_worst_element():
    x = leaf(values_away_from_zero((3, 4), seed=4))
    with pytest.raises(tm.GradcheckError, match=r"element \(1, 2\)"):
        tm.gradcheck(wrong_at(1 * 4 + 2).apply, [x])


def test_uses_a_non_uniform_cotangent():
    x = leaf(values_away_from_zero((4,), seed=5))
    # a sum() on top makes the cotangent uniform, so this backward looks right ...
    assert tm.gradcheck(lambda t: IgnoresCotangentShape.apply(t).sum(), [x])
    # ... but gradcheck's own cotangent must expose it
    with pytest.raises(tm.GradcheckError):
        tm.gradcheck(IgnoresCotangentShape.apply, [x])


def test_catches_error_in_one_output_of_several():
    x = leaf(values_away_from_zero((3,), seed=6))
    with pytest.raises(tm.GradcheckError, match="input 0"):
        tm.gradcheck(lambda t: (t * 2.0, scaled_cube(1.01).apply(t)), [x])


def test_off_by_tolerance_boundaries():
    # a relative error of 1e-6 is far inside rtol=1e-4; with rtol=0, atol=0 even that is flagged
    x = leaf(values_away_from_zero((3,), seed=7))
    assert tm.gradcheck(scaled_cube(1 + 1e-6).apply, [x])
    assert not tm.gradcheck(scaled_cube(1 + 1e-6).apply, [x], atol=0.0, rtol=0.0, raise_exception=False)


# ----- large inputs: random directions -----------------------------------------------------------------------
class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_large_input_is_checked_along_a_few_random_directions():
    x = leaf(values_away_from_zero((60, 50), seed=8))   # 3000 elements
    counted = CallCounter(scaled_cube(1.0).apply)
    assert tm.gradcheck(counted, [x])
    assert counted.calls < 50, f"{counted.calls} calls of fn for one 3000-element input: not directional"


def test_large_input_catches_one_percent_and_missing_gradient():
    x = leaf(values_away_from_zero((60, 50), seed=9))
    with pytest.raises(tm.GradcheckError, match="input 0.*random direction"):
        tm.gradcheck(scaled_cube(1.01).apply, [x])
    a, b = leaf(values_away_from_zero((100, 20), seed=10)), leaf(values_away_from_zero((100, 20), seed=11))
    with pytest.raises(tm.GradcheckError, match="input 1"):
        tm.gradcheck(ProductForgettingSecond.apply, [a, b])


def test_large_input_catches_one_wrong_element():
    x = leaf(values_away_from_zero((40, 50), seed=12))
    assert not tm.gradcheck(wrong_at(777).apply, [x], raise_exception=False)


def test_large_matmul_passes(device):
    rng = np.random.default_rng(13)
    a, b = leaf(rng.standard_normal((64, 48)), device), leaf(rng.standard_normal((48, 32)), device)
    assert tm.gradcheck(lambda p, q: p @ q, [a, b])


# ----- bad use -----------------------------------------------------------------------------------------------
def test_rejects_float32_inputs_naming_the_input():
    x32 = tm.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError) as info:
        tm.gradcheck(lambda t: t * 2.0, [leaf([1.0]), x32])
    message = str(info.value)
    assert "float32" in message and "float64" in message and "input 1" in message


def test_rejects_float32_outputs():
    x = leaf([1.0, 2.0])
    with pytest.raises(TypeError, match="float32"):
        tm.gradcheck(lambda t: t.astype("float32"), [x])


def test_detects_a_non_deterministic_fn():
    x = leaf([1.0, 2.0, 3.0])
    noise = np.random.default_rng()

    def noisy(t):
        return t * 2.0 + noise.standard_normal(t.shape)

    with pytest.raises(tm.GradcheckError, match="deterministic"):
        tm.gradcheck(noisy, [x])


def test_nothing_to_check_is_an_error():
    with pytest.raises(ValueError, match="requires_grad"):
        tm.gradcheck(lambda t: t * 2.0, [leaf([1.0], requires_grad=False)])


@pytest.mark.parametrize("eps", [0.0, -1e-6])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps"):
        tm.gradcheck(lambda t: t * 2.0, [leaf([1.0])], eps=eps)


# ----- gradcheck leaves its inputs as it found them ----------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 1.01])
def test_inputs_data_and_grad_are_restored(scale):
    values = values_away_from_zero((3, 3), seed=14)
    x = leaf(values)
    previous_grad = np.full((3, 3), 42.0)
    x.grad = previous_grad
    tm.gradcheck(scaled_cube(scale).apply, [x], raise_exception=False)
    np.testing.assert_array_equal(host(x), values)       # bit-identical after the perturbations
    assert x.grad is previous_grad
    y = leaf(values)
    tm.gradcheck(scaled_cube(scale).apply, [y], raise_exception=False)
    assert y.grad is None


def test_non_leaf_input_with_right_backward_passes():
    x = leaf([1.0, 2.0, 3.0])
    activation = x * 2.0                         # requires grad, but is not a leaf
    assert tm.gradcheck(lambda t: t * 3.0, [activation])
