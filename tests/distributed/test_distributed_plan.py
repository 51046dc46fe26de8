"""Expert-parallel plan helpers against plain loops, and exchange_rows with one rank (identity, gradcheck)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe.distributed import (
    LocalCommunicator, destination_counts, expert_major_order, inverse_permutation, local_experts,
    plan_expert_exchange,
)
from tinymoe.functional.all_to_all import exchange_rows


def regroup_by_loop(counts):
    """Label received rows (source, expert, i) in source-major arrival order; list them expert-major."""
    arrival = [(s, e, i) for s in range(counts.shape[0]) for e in range(counts.shape[1]) for i in range(counts[s, e])]
    wanted = [(s, e, i) for e in range(counts.shape[1]) for s in range(counts.shape[0]) for i in range(counts[s, e])]
    return np.array([arrival.index(label) for label in wanted], dtype=np.int64)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_expert_major_order_matches_a_plain_loop(n_sources, n_local, data):
    counts = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n_sources * n_local,
                                         max_size=n_sources * n_local))).reshape(n_sources, n_local)
    order, offsets = expert_major_order(counts)
    np.testing.assert_array_equal(order, regroup_by_loop(counts))
    np.testing.assert_array_equal(offsets, [0] + [int(counts[:, : e + 1].sum()) for e in range(n_local)])
    inverse = inverse_permutation(order)
    np.testing.assert_array_equal(order[inverse], np.arange(order.size))
    rows = np.random.default_rng(0).standard_normal((order.size, 2))
    np.testing.assert_array_equal(rows[order][inverse], rows)


def test_destination_counts_sum_each_ranks_experts():
    kept = np.array([3, 0, 2, 5, 1, 4])
    for n_ranks in (1, 2, 3, 6):
        per_rank = len(kept) // n_ranks
        expected = [sum(kept[e] for e in range(len(kept)) if e // per_rank == p) for p in range(n_ranks)]
        np.testing.assert_array_equal(destination_counts(kept, n_ranks), expected)
        assert [list(local_experts(p, 6, n_ranks)) for p in range(n_ranks)] == \
            [[e for e in range(6) if e // per_rank == p] for p in range(n_ranks)]


@pytest.mark.parametrize("call, message", [
    (lambda: destination_counts([1, 2, 3], 2), "n_experts=3 is not divisible by n_ranks=2"),
    (lambda: destination_counts([[1, 2]], 1), "must be a 1-D array of counts"),
    (lambda: destination_counts([1, -2], 1), "must be a 1-D array of counts"),
    (lambda: local_experts(2, 4, 2), r"rank=2 must be in \[0, 2\)"),
    (lambda: expert_major_order(np.array([1, 2])), "must be a 2-D array"),
])
def test_plan_helpers_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_plan_on_one_rank_keeps_rows_in_place():
    plan = plan_expert_exchange(np.array([2, 0, 3]), LocalCommunicator())
    np.testing.assert_array_equal(plan.send_counts, [5])
    np.testing.assert_array_equal(plan.recv_counts, [5])
    np.testing.assert_array_equal(plan.order, np.arange(5))  # one source: already expert-major
    np.testing.assert_array_equal(plan.expert_offsets, [0, 2, 2, 5])


def test_exchange_rows_on_one_rank_is_the_identity_with_its_gradient():
    comm = LocalCommunicator()
    data = np.random.default_rng(1).standard_normal((5, 3))
    rows = tm.tensor(data, dtype="float64", requires_grad=True)
    out = exchange_rows(rows, [5], [5], comm)
    np.testing.assert_array_equal(out.numpy(), data)
    cotangent = np.random.default_rng(2).standard_normal((5, 3))
    out.backward(cotangent)
    np.testing.assert_array_equal(rows.grad, cotangent)
    assert tm.gradcheck(lambda t: exchange_rows(t, np.array([5]), np.array([5]), comm) * 2.0,
                        [tm.tensor(data, dtype="float64", requires_grad=True)])
    empty = tm.tensor(np.zeros((0, 3)), dtype="float64", requires_grad=True)
    assert exchange_rows(empty, [0], [0], comm).shape == (0, 3)


@pytest.mark.parametrize("call, error, message", [
    (lambda c: exchange_rows(np.zeros((2, 2)), [2], [2], c), TypeError, "rows must be a Tensor"),
    (lambda c: exchange_rows(tm.tensor(np.zeros((2, 2))), [3], [3], c), ValueError, "sum to 3 but rows has 2"),
    (lambda c: exchange_rows(tm.tensor(np.zeros((2, 2))), [2], [2], "world"), TypeError, "must be a tinymoe"),
    (lambda c: exchange_rows(tm.tensor(np.zeros(2)), [2], [2], c), ValueError, "must have 2 dimension"),
])
def test_exchange_rows_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(LocalCommunicator())
