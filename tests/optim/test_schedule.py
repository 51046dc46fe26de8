"""Linear warm-up + cosine decay: lr(s) = base·(s+1)/W for s < W, then
min + (base − min)·(1 + cos(π·p))/2 with p = (s − W)/(T − W) clipped to [0, 1] (steps 0-based)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymoe.nn.module import Parameter
from tinymoe.optim import SGD, AdamW, WarmupCosine, warmup_cosine

BASE, MIN, WARMUP, TOTAL = 1e-2, 1e-3, 10, 110


def test_warmup_is_linear_up_to_the_peak():
    assert warmup_cosine(0, BASE, WARMUP, TOTAL, MIN) == pytest.approx(BASE / WARMUP)
    assert warmup_cosine(4, BASE, WARMUP, TOTAL, MIN) == pytest.approx(BASE * 5 / WARMUP)
    assert warmup_cosine(WARMUP - 1, BASE, WARMUP, TOTAL, MIN) == pytest.approx(BASE)  # the peak
    steps = [warmup_cosine(s, BASE, WARMUP, TOTAL, MIN) for s in range(WARMUP)]
    np.testing.assert_allclose(np.diff(steps), BASE / WARMUP, rtol=1e-9)  # equal increments


def test_cosine_starts_at_the_peak_halves_in_the_middle_and_ends_at_the_floor():
    assert warmup_cosine(WARMUP, BASE, WARMUP, TOTAL, MIN) == pytest.approx(BASE)
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert warmup_cosine(middle, BASE, WARMUP, TOTAL, MIN) == pytest.approx((BASE + MIN) / 2)
    quarter = WARMUP + (TOTAL - WARMUP) // 4
    assert warmup_cosine(quarter, BASE, WARMUP, TOTAL, MIN) == pytest.approx(
        MIN + (BASE - MIN) * (1 + math.cos(math.pi / 4)) / 2)
    assert warmup_cosine(TOTAL, BASE, WARMUP, TOTAL, MIN) == pytest.approx(MIN)
    assert warmup_cosine(TOTAL + 50, BASE, WARMUP, TOTAL, MIN) == pytest.approx(MIN)  # stays at the floor


def test_no_warmup_starts_at_base_and_min_lr_defaults_to_zero():
    assert warmup_cosine(0, BASE, 0, 100) == pytest.approx(BASE)
    assert warmup_cosine(50, BASE, 0, 100) == pytest.approx(BASE / 2)
    assert warmup_cosine(100, BASE, 0, 100) == pytest.approx(0.0, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(warmup=st.integers(0, 20), extra=st.integers(1, 200), base=st.floats(1e-5, 1.0),
       floor_fraction=st.floats(0.0, 1.0))
def test_shape_rises_then_never_increases_and_stays_within_bounds(warmup, extra, base, floor_fraction):
    total, floor = warmup + extra, base * floor_fraction
    values = np.array([warmup_cosine(s, base, warmup, total, floor) for s in range(total + 3)])
    assert np.all(values <= base * (1 + 1e-12))
    assert np.all(values[:max(warmup, 1)] > 0)
    assert np.all(values[warmup:] >= floor * (1 - 1e-12))  # warm-up may start below the floor
    assert np.all(np.diff(values[:warmup]) > 0)
    assert np.all(np.diff(values[warmup:]) <= 1e-15)
    assert values[-1] == pytest.approx(floor, abs=1e-12)


def test_scheduler_drives_the_optimizer_lr_every_step():
    parameter = Parameter(np.zeros(2))
    optimizer = AdamW([parameter], lr=BASE)
    schedule = WarmupCosine(optimizer, WARMUP, TOTAL, MIN)
    seen = [optimizer.lr]
    for _ in range(TOTAL):
        schedule.step()
        seen.append(optimizer.lr)
    expected = [warmup_cosine(s, BASE, WARMUP, TOTAL, MIN) for s in range(TOTAL + 1)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[0] == pytest.approx(BASE / WARMUP)  # already warming up before the first step


def test_scheduler_lr_reaches_the_update():
    """The lr the schedule sets is the one SGD uses: p moves by lr(s)·g at step s."""
    parameter = Parameter(np.zeros(1))
    optimizer = SGD([parameter], lr=1.0)
    schedule = WarmupCosine(optimizer, 4, 20)
    positions = []
    for _ in range(6):
        parameter.grad = np.ones(1)
        optimizer.step()
        schedule.step()
        positions.append(parameter.data[0])
    expected = -np.cumsum([warmup_cosine(s, 1.0, 4, 20) for s in range(6)])
    np.testing.assert_allclose(positions, expected, rtol=1e-12)


def test_scheduler_state_dict_continues_in_a_fresh_scheduler():
    first = SGD([Parameter(np.zeros(1))], lr=BASE)
    schedule = WarmupCosine(first, WARMUP, TOTAL, MIN)
    for _ in range(37):
        schedule.step()
    state = schedule.state_dict()
    second = SGD([Parameter(np.zeros(1))], lr=123.0)  # a fresh optimizer with another lr
    restored = WarmupCosine(second, WARMUP, TOTAL, MIN)
    restored.load_state_dict(state)
    assert second.lr == pytest.approx(first.lr)
    for _ in range(5):
        schedule.step()
        restored.step()
        assert second.lr == pytest.approx(first.lr, rel=1e-12)


@pytest.mark.parametrize("warmup, total", [(-1, 10), (0, 0), (5, -3)])
def test_scheduler_rejects_bad_lengths(warmup, total):
    with pytest.raises(ValueError, match="warmup_steps|total_steps"):
        WarmupCosine(SGD([Parameter(np.zeros(1))], lr=0.1), warmup, total)


def test_scheduler_keeps_the_ratio_between_group_learning_rates():
    fast, slow = Parameter(np.zeros(1)), Parameter(np.zeros(1))
    optimizer = SGD([{"params": [fast]}, {"params": [slow], "lr": 0.01}], lr=0.1)
    schedule = WarmupCosine(optimizer, 0, 10)
    for _ in range(3):
        schedule.step()
    fast_lr, slow_lr = (group["lr"] for group in optimizer.param_groups)
    assert fast_lr == pytest.approx(10 * slow_lr)


# ----- bad values: refused with the argument named, never clamped --------------------------------------------
def test_a_floor_above_the_learning_rate_is_refused_not_clamped():
    optimizer = SGD([Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"min_lr=0\.5.*0\.1.*group 0"):
        WarmupCosine(optimizer, 2, 10, min_lr=0.5)
    assert optimizer.lr == 0.1  # untouched
    groups = SGD([{"params": [Parameter(np.zeros(1))]}, {"params": [Parameter(np.zeros(1))], "lr": 1e-4}], lr=0.1)
    with pytest.raises(ValueError, match="group 1"):
        WarmupCosine(groups, 2, 10, min_lr=1e-3)
    with pytest.raises(ValueError, match="min_lr"):
        warmup_cosine(5, 0.1, 2, 10, min_lr=0.2)


def test_a_floor_equal_to_the_learning_rate_is_a_constant_schedule_after_warm_up():
    optimizer = SGD([Parameter(np.zeros(1))], lr=0.1)
    schedule = WarmupCosine(optimizer, 2, 10, min_lr=0.1)
    seen = []
    for _ in range(10):
        seen.append(optimizer.lr)
        schedule.step()
    assert seen[:2] == [0.05, 0.1] and all(lr == pytest.approx(0.1, rel=1e-15) for lr in seen[2:])


@pytest.mark.parametrize("options, error, name", [
    (dict(min_lr=-1e-3), ValueError, "min_lr"),
    (dict(min_lr=math.nan), TypeError, "min_lr"),
    (dict(min_lr=True), TypeError, "min_lr"),
    (dict(min_lr="0"), TypeError, "min_lr"),
    (dict(warmup_steps=2.5), TypeError, "warmup_steps"),
    (dict(warmup_steps=True), TypeError, "warmup_steps"),
    (dict(total_steps=10.0), TypeError, "total_steps"),
], ids=["min_lr-negative", "min_lr-nan", "min_lr-bool", "min_lr-str", "warmup-float", "warmup-bool", "total-float"])
def test_scheduler_rejects_bad_types_and_values_naming_them(options, error, name):
    arguments = {"warmup_steps": 2, "total_steps": 10, "min_lr": 0.0, **options}
    with pytest.raises(error, match=name):
        WarmupCosine(SGD([Parameter(np.zeros(1))], lr=0.1), **arguments)


@pytest.mark.parametrize("state, name", [
    ({"step_index": -1, "base_lrs": [0.1]}, "step_index"),
    ({"step_index": 1.5, "base_lrs": [0.1]}, "step_index"),
    ({"step_index": 1, "base_lrs": "0.1"}, "base_lrs"),
    ({"step_index": 1, "base_lrs": [math.inf]}, "base_lrs"),
    ({"step_index": 1, "base_lrs": [0.1, 0.2]}, "group"),
    ({"step_index": 1, "base_lrs": [1e-5]}, "min_lr"),
    ({"base_lrs": [0.1]}, "step_index"),
    ([1, [0.1]], "dict"),
], ids=["negative-step", "float-step", "str-lrs", "inf-lr", "too-many", "below-floor", "no-step", "list"])
def test_scheduler_load_state_dict_refuses_damaged_state_and_changes_nothing(state, name):
    optimizer = SGD([Parameter(np.zeros(1))], lr=0.1)
    schedule = WarmupCosine(optimizer, 2, 10, min_lr=1e-3)
    with pytest.raises((ValueError, TypeError), match=name):
        schedule.load_state_dict(state)
    assert schedule.step_index == 0 and schedule.base_lrs == [0.1] and optimizer.lr == 0.05
