"""gradcheck(discrete=state_fn): perturbations whose ±eps flips a discrete decision (a ReLU kink, a top-k
choice) are excluded and reported, never silently passed or failed; an input with nothing left fails."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe import functional as F
from helpers import leaf


def relu_state(t):
    return t.data > 0


def kinked_values():
    """(2, 3) values away from 0, except x[1, 2] = 1e-7: inside ±eps = 1e-6 of ReLU's kink."""
    values = np.array([[0.8, -1.2, 0.6], [-0.7, 1.1, 1e-7]])
    return values, (1, 2)


class WrongReluAt(tm.Function):
    """relu with the gradient of element (0, 0) doubled."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.maximum(x, 0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = grad * (x > 0)
        grad_x[0, 0] *= 2
        return grad_x


def test_a_kink_inside_eps_fails_a_plain_check():
    values, _ = kinked_values()
    with pytest.raises(tm.GradcheckError, match=r"element \(1, 2\)"):
        tm.gradcheck(F.relu, [leaf(values)])


def test_the_flipping_element_is_excluded_and_reported_and_the_rest_passes():
    values, kink = kinked_values()
    report = tm.gradcheck(F.relu, [leaf(values)], discrete=relu_state, return_report=True)
    assert report.passed
    # oracle: only x[1, 2] = 1e-7 changes sign, and only at x − eps
    assert [(e.input, e.kind, e.where, e.sides) for e in report.excluded] == [(0, "element", kink, "-")]
    assert report.checked == {0: 5} and report.perturbations == {0: 6}
    assert "excluded" in report.format() and "element (1, 2)" in report.format()


def test_exclusion_does_not_hide_a_wrong_gradient_elsewhere():
    values, _ = kinked_values()
    with pytest.raises(tm.GradcheckError) as info:
        tm.gradcheck(WrongReluAt.apply, [leaf(values)], discrete=relu_state)
    report = info.value.report
    assert [m.where for m in report.mismatches] == [(0, 0)]
    assert [e.where for e in report.excluded] == [(1, 2)]
    message = str(info.value)
    assert "element (0, 0)" in message and "excluded" in message and "1 of 6 for input 0" in message


def test_top_k_near_tie_flips_on_one_side():
    # row 0: 0.5 and 0.5 + 4e-7 tie within eps; top-1 picks column 1 at x and column 0 after either nudge
    values = np.array([[0.5, 0.5 + 4e-7, -1.0], [2.0, -0.3, 0.9]])
    x = leaf(values)

    def state(t):
        return F.topk(t, 1)[1]

    report = tm.gradcheck(lambda t: F.topk(t, 1)[0], [x], discrete=state, return_report=True)
    assert report.passed
    excluded = {(e.where, e.sides) for e in report.excluded}
    assert excluded == {((0, 0), "+"), ((0, 1), "-")}          # raising x00 or lowering x01 flips it
    with pytest.raises(tm.GradcheckError):
        tm.gradcheck(lambda t: F.topk(t, 1)[0], [x])


def test_state_may_be_a_tuple_or_dict_of_arrays_tensors_and_scalars():
    values, kink = kinked_values()
    for state in (lambda t: (relu_state(t), int(relu_state(t).sum())),
                  lambda t: {"mask": t > 0.0, "count": float((t.data > 0).sum())},
                  lambda t: [relu_state(t)]):
        report = tm.gradcheck(F.relu, [leaf(values)], discrete=state, return_report=True)
        assert report.passed and [e.where for e in report.excluded] == [kink]


def test_every_element_flipping_fails_saying_nothing_was_checked():
    x = leaf([[1e-8, -1e-8]])
    with pytest.raises(tm.GradcheckError, match="nothing of it was checked") as info:
        tm.gradcheck(F.relu, [x], discrete=relu_state)
    assert len(info.value.report.excluded) == 2 and not info.value.report.mismatches


def test_every_random_direction_flipping_fails_too():
    values = np.random.default_rng(0).uniform(0.5, 1.5, (10, 10))
    values[3, 4] = 1e-9                               # every random direction crosses this kink
    with pytest.raises(tm.GradcheckError, match=r"all 4 perturbations flipped") as info:
        tm.gradcheck(F.relu, [leaf(values)], discrete=relu_state)
    assert {e.kind for e in info.value.report.excluded} == {"direction"}


def test_one_input_all_flipped_fails_even_when_another_passes():
    a, b = leaf([[1e-8]]), leaf([[0.7, -0.4]])
    with pytest.raises(tm.GradcheckError, match="input 0 of shape"):
        tm.gradcheck(lambda p, q: F.relu(p) * q, [a, b], discrete=lambda p, q: relu_state(p))


def test_a_non_deterministic_state_is_an_error():
    rng = np.random.default_rng()
    with pytest.raises(tm.GradcheckError, match="discrete state is not deterministic"):
        tm.gradcheck(F.relu, [leaf([1.0, 2.0])], discrete=lambda t: rng.integers(0, 1 << 30))


def test_discrete_must_be_callable():
    with pytest.raises(TypeError, match="discrete"):
        tm.gradcheck(F.relu, [leaf([1.0])], discrete=np.array([True]))


def test_inputs_restored_after_a_check_with_exclusions():
    values, _ = kinked_values()
    x = leaf(values)
    tm.gradcheck(F.relu, [x], discrete=relu_state)
    np.testing.assert_array_equal(x.numpy(), values)
    assert x.grad is None
