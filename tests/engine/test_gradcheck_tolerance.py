"""gradcheck's tolerance follows the round-off of each output: atol_effective = atol + c·eps64·Σ|v·out|/eps,
outputs are checked one by one, and the failure report names input, multi-index, analytic vs numeric."""
import numpy as np
import pytest

import tinymoe as tm
from helpers import leaf

EPS64 = np.finfo(np.float64).eps


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


def wrong_at(*flat_indices):
    """y = 2x with the gradient's sign flipped at the given flat positions."""

    class WrongAt(tm.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            grad_x = 2 * grad
            grad_x.reshape(-1)[list(flat_indices)] *= -1
            return grad_x

    return WrongAt


def values_away_from_zero(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.5, shape)


def huge_plus_small(scale):
    """1.3e6 (a z-loss-sized term whose derivative is 0) + 1e-2·x³ (small, with the backward scaled)."""
    cube = scaled_cube(scale)
    return lambda t: 1e-2 * cube.apply(t) + 1.3e6


# ----- the round-off of a large output -----------------------------------------------------------------------
def test_huge_output_fails_a_fixed_atol_but_passes_the_scaled_tolerance():
    x = leaf(values_away_from_zero((2, 3), seed=1))
    # the numeric derivative is blurred by ~ulp(1.3e6)/(2·eps) ≈ 1e-4, ten times the fixed atol ...
    report = tm.gradcheck(huge_plus_small(1.0), [x], roundoff=0.0, raise_exception=False, return_report=True)
    assert not report.passed
    assert all(m.abs_error < 3e-4 for m in report.mismatches)     # round-off, not a wrong gradient
    # ... which the tolerance scaled by the output's magnitude absorbs
    assert tm.gradcheck(huge_plus_small(1.0), [x])


def test_a_wrong_gradient_under_a_huge_output_still_fails():
    x = leaf(values_away_from_zero((2, 3), seed=1))
    for wrong in (2.0, -1.0, 0.0):          # doubled, sign flipped, missing: each off by >= 3e-3·|v|
        with pytest.raises(tm.GradcheckError, match="input 0"):
            tm.gradcheck(huge_plus_small(wrong), [x])


def test_each_output_is_checked_on_its_own():
    # a huge first output must not blur the check of a small second one: its 1% error stays visible
    x = leaf(values_away_from_zero((2, 3), seed=2))
    with pytest.raises(tm.GradcheckError) as info:
        tm.gradcheck(lambda t: (t * 0.0 + 1e9, 1e-3 * scaled_cube(1.1).apply(t)), [x])
    outputs = {m.output for m in info.value.report.mismatches}
    assert outputs == {1}
    assert info.value.report.tolerances[1] < 1.1e-5 < info.value.report.tolerances[0]


def test_effective_atol_grows_with_the_output_and_shrinks_with_eps():
    x = leaf(values_away_from_zero((3,), seed=3))

    def excess(scale, eps):
        report = tm.gradcheck(lambda t: t * 0.0 + scale, [x], eps=eps, return_report=True)
        return report.tolerances[0] - report.atol

    base = excess(1e3, 1e-6)
    assert base > 0
    # c·eps64·Σ|v·out|/eps: linear in |out| (same seed, same v), inverse in eps
    assert excess(1e5, 1e-6) == pytest.approx(100 * base, rel=1e-12)
    assert excess(1e3, 2e-6) == pytest.approx(base / 2, rel=1e-12)
    assert excess(-1e3, 1e-6) == pytest.approx(base, rel=1e-12)
    # and the constant: for out = s·ones(3), Σ|v·out| = s·Σ|v| with v the seeded standard normals
    v = np.random.default_rng(0).standard_normal(3)
    assert base == pytest.approx(4.0 * EPS64 * 1e3 * np.abs(v).sum() / 1e-6, rel=1e-12)


def test_roundoff_must_be_non_negative():
    with pytest.raises(ValueError, match="roundoff"):
        tm.gradcheck(lambda t: t * 2.0, [leaf([1.0])], roundoff=-1.0)


# ----- the failure report ------------------------------------------------------------------------------------
def test_report_on_the_exception_names_input_multi_index_and_values():
    x = leaf(values_away_from_zero((3, 4), seed=4))
    with pytest.raises(AssertionError) as info:                    # GradcheckError is an AssertionError
        tm.gradcheck(lambda t: wrong_at(1 * 4 + 2).apply(t).sum(), [x])
    report = info.value.report
    assert not report.passed and not report
    (mismatch,) = report.mismatches
    assert (mismatch.input, mismatch.output, mismatch.kind, mismatch.where) == (0, 0, "element", (1, 2))
    # scalar output: analytic = -2v, numeric = 2v for the same cotangent v
    assert mismatch.analytic == pytest.approx(-mismatch.numeric, rel=1e-6)
    assert mismatch.abs_error == pytest.approx(2 * abs(mismatch.numeric), rel=1e-6)
    assert mismatch.rel_error == pytest.approx(2.0, rel=1e-6)
    assert mismatch.tolerance == pytest.approx(report.tolerances[0] + 1e-4 * abs(mismatch.numeric))
    message = str(info.value)
    assert "input 0 of shape (3, 4)" in message and "element (1, 2)" in message
    assert f"{mismatch.analytic:.6g}" in message and f"{mismatch.numeric:.6g}" in message
    assert "relative" in message and "atol_effective" in message
    assert report.summary() in message


def test_report_lists_the_worst_five_first():
    x = leaf(values_away_from_zero((3, 4), seed=5))
    wrong = [0, 3, 5, 6, 8, 10, 11]
    with pytest.raises(tm.GradcheckError) as info:
        tm.gradcheck(wrong_at(*wrong).apply, [x])
    report = info.value.report
    assert sorted(np.ravel_multi_index(m.where, (3, 4)) for m in report.mismatches) == wrong
    worst = report.worst(5)
    assert len(worst) == 5 and [m.excess for m in worst] == sorted((m.excess for m in worst), reverse=True)
    assert min(m.excess for m in worst) >= max(m.excess for m in report.mismatches if m not in worst)
    rows = [line for line in str(info.value).splitlines() if line.strip().startswith("input 0 of shape")]
    assert len(rows) == 5
    assert "7 comparison(s) failed" in str(info.value)


def test_return_report_on_success_counts_comparisons():
    x, y = leaf(values_away_from_zero((2, 3), seed=6)), leaf(values_away_from_zero((4,), seed=7))
    report = tm.gradcheck(lambda a, b: (a * 2.0, b.sum() * a.sum()), [x, y], return_report=True)
    assert report.passed and report and not report.excluded
    assert report.checked == {0: 6 * 2, 1: 4 * 2}                 # elements × outputs
    assert "passed" in report.summary()
