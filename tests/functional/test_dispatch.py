"""The public dispatch ops (gather_rows, combine_rows, routing_plan): values against plain loops, float64
gradchecks, the checks that an inverse really inverts its index, dtype strictness, and the unchecked entries."""
import numpy as np
import pytest

import tinymoe as tm
from helpers import host
from tinymoe.engine.backend import cuda_available
from tinymoe.functional import combine_rows, gather_rows, routing_plan
from tinymoe.functional.dispatch import combine_rows_unchecked, gather_rows_unchecked, routing_plan_unchecked

NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")]

EXPERT_IDS = np.array([[0, 2], [2, 1], [0, 1], [2, 0], [1, 2]])  # T = 5, K = 2, E = 3


def leaf(array, dtype="float64"):
    return tm.tensor(np.asarray(array), requires_grad=True, dtype=dtype)


def plan_of(capacity=None):
    return routing_plan(EXPERT_IDS, 3, capacity)


# ----- values and gradients against plain loops ----------------------------------------------------------
def sorted_assignments_by_loops(expert_ids, n_experts, capacity):
    """(token, slot) of each row: expert by expert, first choices before second ones, then token order;
    an expert keeps its first `capacity` (Switch/GShard priority)."""
    n_tokens, top_k = expert_ids.shape
    rows = []
    for expert in range(n_experts):
        asked = [(t, j) for j in range(top_k) for t in range(n_tokens) if expert_ids[t, j] == expert]
        rows += asked if capacity is None else asked[:capacity]
    return rows


@pytest.mark.parametrize("capacity", [None, 1, 2])
def test_plan_gather_and_combine_match_plain_loops(capacity):
    plan = plan_of(capacity)
    rows_by_loops = sorted_assignments_by_loops(EXPERT_IDS, 3, capacity)
    np.testing.assert_array_equal(plan.row_token, [t for t, _ in rows_by_loops])
    np.testing.assert_array_equal(plan.row_assignment, [2 * t + j for t, j in rows_by_loops])
    rng = np.random.default_rng(0)
    x, weights = rng.standard_normal((5, 4)), rng.random((5, 2))
    rows = gather_rows(leaf(x), plan.row_token, token_rows=plan.assignment_row)
    np.testing.assert_array_equal(rows.numpy(), np.array([x[t] for t, _ in rows_by_loops]).reshape(-1, 4))
    y = rng.standard_normal(rows.shape)
    out = combine_rows(leaf(y), plan.assignment_row, leaf(weights), row_assignment=plan.row_assignment)
    expected = np.zeros((5, 4))
    for row, (t, j) in enumerate(rows_by_loops):
        expected[t] += weights[t, j] * y[row]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("with_inverse", [False, True])
def test_gradcheck_in_float64(with_inverse):
    plan = plan_of(capacity=1)
    rng = np.random.default_rng(1)
    x, y = leaf(rng.standard_normal((5, 3))), leaf(rng.standard_normal((plan.n_rows, 3)))
    weights = leaf(rng.random((5, 2)))
    token_rows = plan.assignment_row if with_inverse else None
    row_assignment = plan.row_assignment if with_inverse else None
    assert tm.gradcheck(lambda x_: gather_rows(x_, plan.row_token, token_rows=token_rows), [x])
    assert tm.gradcheck(lambda y_, w_: combine_rows(y_, plan.assignment_row, w_, row_assignment=row_assignment),
                        [y, weights])


def test_combine_gradients_match_formulas():
    """dy[r] = w[a]·g[t(a)] for the assignment a reading r; dw[t, j] = <g[t], y[index[t, j]]>."""
    plan = plan_of()
    rng = np.random.default_rng(2)
    y, weights = leaf(rng.standard_normal((plan.n_rows, 3))), leaf(rng.random((5, 2)))
    cotangent = rng.standard_normal((5, 3))
    combine_rows(y, plan.assignment_row, weights, row_assignment=plan.row_assignment).backward(cotangent)
    for r in range(plan.n_rows):
        t, j = divmod(int(plan.row_assignment[r]), 2)
        np.testing.assert_allclose(y.grad[r], weights.numpy()[t, j] * cotangent[t], rtol=1e-14)
    for t in range(5):
        for j in range(2):
            expected = cotangent[t] @ y.numpy()[plan.assignment_row[t, j]]
            assert weights.grad[t, j] == pytest.approx(expected, rel=1e-12)


# ----- an inverse that does not invert its index is refused -------------------------------------------------
def test_gather_refuses_token_rows_listing_a_position_under_the_wrong_row():
    plan = plan_of()
    wrong = plan.assignment_row.copy()
    wrong[[0, 1]] = wrong[[1, 0]]  # tokens 0 and 1 swap their lists
    with pytest.raises(ValueError, match=r"gather_rows: token_rows does not invert index: it lists position"):
        gather_rows(leaf(np.ones((5, 2))), plan.row_token, token_rows=wrong)


def test_gather_refuses_token_rows_missing_or_repeating_a_position():
    plan = plan_of()
    x = leaf(np.ones((5, 2)))
    missing = plan.assignment_row.copy()
    missing[0, 0] = -1
    with pytest.raises(ValueError, match=r"token_rows does not invert index: position \d+ is listed 0 times"):
        gather_rows(x, plan.row_token, token_rows=missing)
    repeated = np.concatenate([plan.assignment_row, plan.assignment_row[:, :1]], axis=1)
    with pytest.raises(ValueError, match=r"is listed 2 times"):
        gather_rows(x, plan.row_token, token_rows=repeated)


def test_gather_refuses_token_rows_of_the_wrong_shape_or_range():
    plan = plan_of()
    x = leaf(np.ones((5, 2)))
    with pytest.raises(ValueError, match="token_rows must have one row per row of x"):
        gather_rows(x, plan.row_token, token_rows=plan.assignment_row[:4])
    with pytest.raises(IndexError, match="token_rows holds 10"):
        gather_rows(x, plan.row_token, token_rows=np.where(plan.assignment_row == 0, 10, plan.assignment_row))


def test_combine_refuses_row_assignment_pointing_at_another_entry():
    plan = plan_of()
    wrong = plan.row_assignment.copy()
    wrong[[0, 1]] = wrong[[1, 0]]
    with pytest.raises(ValueError, match=r"combine_rows: row_assignment does not invert index: row_assignment\[0\]"):
        combine_rows(leaf(np.ones((plan.n_rows, 2))), plan.assignment_row, row_assignment=wrong)


def test_combine_refuses_row_assignment_that_misses_an_entry_or_a_row_read_twice():
    plan = plan_of()
    y = leaf(np.ones((plan.n_rows, 2)))
    missing = plan.row_assignment.copy()
    missing[3] = -1
    with pytest.raises(ValueError, match=r"index.flat\[\d+\] = 3 but row_assignment\[3\] = -1"):
        combine_rows(y, plan.assignment_row, row_assignment=missing)
    dropping = plan_of(capacity=1)
    read_twice = dropping.assignment_row.copy()
    read_twice[read_twice < 0] = 0  # dropped entries now read row 0 too: it has no single owner for dy
    y = leaf(np.ones((dropping.n_rows, 2)))
    with pytest.raises(ValueError, match=r"index.flat\[\d+\] = 0 but .* at most one entry of index"):
        combine_rows(y, read_twice, row_assignment=dropping.row_assignment)
    assert combine_rows(y, read_twice).shape == (5, 2)  # without an inverse that index is fine


def test_combine_refuses_weights_of_another_float_dtype():
    plan = plan_of()
    y = leaf(np.ones((plan.n_rows, 2)), dtype="float32")
    with pytest.raises(TypeError, match="combine_rows: weights is float64 but y is float32"):
        combine_rows(y, plan.assignment_row, leaf(np.ones((5, 2))))


def test_routing_plan_checks_its_arguments():
    with pytest.raises(IndexError, match="expert_ids holds 3"):
        routing_plan(EXPERT_IDS + 1, 3)
    with pytest.raises(ValueError, match="expert_ids must be a 2-D array"):
        routing_plan(EXPERT_IDS[0], 3)
    with pytest.raises(ValueError, match="capacity=-1 must be >= 0"):
        routing_plan(EXPERT_IDS, 3, capacity=-1)
    with pytest.raises(ValueError, match="valid must be a bool array of shape"):
        routing_plan(EXPERT_IDS, 3, valid=np.ones((5, 2), dtype=np.int64))


# ----- the unchecked entries ----------------------------------------------------------------------------------
def test_unchecked_entries_give_the_validated_results():
    plan, unchecked_plan = plan_of(1), routing_plan_unchecked(EXPERT_IDS, 3, 1)
    np.testing.assert_array_equal(unchecked_plan.assignment_row, plan.assignment_row)
    np.testing.assert_array_equal(unchecked_plan.requested_per_expert, [3, 3, 4])
    np.testing.assert_array_equal(unchecked_plan.kept_per_expert, [1, 1, 1])
    rng = np.random.default_rng(3)
    x, weights = rng.standard_normal((5, 3)), rng.random((5, 2))
    results = []
    for gather, combine in ((gather_rows, combine_rows), (gather_rows_unchecked, combine_rows_unchecked)):
        x_t, w_t = leaf(x), leaf(weights)
        rows = gather(x_t, plan.row_token, token_rows=plan.assignment_row)
        out = combine(rows * rows, plan.assignment_row, w_t, row_assignment=plan.row_assignment)
        out.sum().backward()
        results.append((out.numpy(), x_t.grad, w_t.grad))
    for validated, unchecked in zip(*results):
        np.testing.assert_array_equal(validated, unchecked)


@pytest.mark.parametrize("device, y_dtype, weights_dtype", [
    pytest.param("cuda", "float16", "float32", marks=NEEDS_CUDA, id="cuda-float16-rows"),  # as the MoE layer does
    pytest.param("cpu", "float32", "float64", id="cpu-float32-rows"),
])
def test_unchecked_combine_casts_weights_to_the_rows_dtype(device, y_dtype, weights_dtype):
    """The MoE layer's float16 layers (CUDA only) combine their router's float32 weights into float16 rows."""
    plan = routing_plan_unchecked(tm.engine.backend.module_for_device(device).asarray(EXPERT_IDS), 3)
    rng = np.random.default_rng(4)
    y_host, weights_host = rng.standard_normal((plan.n_rows, 2)), rng.random((5, 2))
    y = tm.tensor(y_host, requires_grad=True, dtype=y_dtype, device=device)
    weights = tm.tensor(weights_host, requires_grad=True, dtype=weights_dtype, device=device)
    out = combine_rows_unchecked(y, plan.assignment_row, weights, row_assignment=plan.row_assignment)
    assert out.dtype == np.dtype(y_dtype)
    rows_used = host(plan.assignment_row)
    y_used = y.numpy().astype(np.float64)
    weights_cast = weights.numpy().astype(y_dtype).astype(np.float64)
    expected = np.zeros((5, 2))
    for t in range(5):
        for j in range(2):
            expected[t] += weights_cast[t, j] * y_used[rows_used[t, j]]
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=2e-3, atol=2e-3)
    out.sum().backward()
    assert weights.grad.dtype == np.dtype(weights_dtype) and y.grad.dtype == np.dtype(y_dtype)
