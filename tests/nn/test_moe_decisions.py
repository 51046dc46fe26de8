"""MoE.last_decisions: (expert_ids (T, K), kept (T, K)) of the last forward, against a recount in plain loops
from the router's formula (softmax with capacity, expert choice, top-p with capacity)."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.testing import moe_decisions

T, D, E = 24, 6, 4


def probabilities(x, weight):
    logits = x @ weight.T
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def ranked(row):
    """Experts of one token by p, largest first, ties to the lower index (a plain sort)."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))


def keep_by_rank_then_token(expert_ids, used, capacity):
    """Capacity rule of the routing plan: slot rank 0 of every token first, then rank 1, ...; in token order."""
    kept = np.zeros(expert_ids.shape, dtype=bool)
    taken = [0] * E
    for slot in range(expert_ids.shape[1]):
        for token in range(expert_ids.shape[0]):
            expert = expert_ids[token, slot]
            if used[token, slot] and (capacity is None or taken[expert] < capacity):
                taken[expert] += 1
                kept[token, slot] = True
    return kept


def expected_decisions(router, x, weight, top_k, capacity_factor, top_p=None):
    p = probabilities(x, weight)
    if router == "expert_choice":
        capacity = math.ceil(capacity_factor * T / E)
        ids = np.tile(np.arange(E), (T, 1))
        kept = np.zeros((T, E), dtype=bool)
        for expert in range(E):
            for token in sorted(range(T), key=lambda t: (-p[t, expert], t))[:capacity]:
                kept[token, expert] = True
        return ids, kept
    ids = np.array([ranked(row)[:top_k] for row in p])
    used = np.ones(ids.shape, dtype=bool)
    if router == "top_p":
        for token in range(T):
            mass = 0.0
            for slot in range(top_k):
                used[token, slot] = slot == 0 or mass < top_p
                mass += p[token, ids[token, slot]]
    capacity = math.ceil(capacity_factor * T * top_k / E)
    return ids, keep_by_rank_then_token(ids, used, capacity)


@pytest.mark.parametrize("router, options", [
    ("softmax", dict(top_k=2, capacity_factor=0.75)),
    ("expert_choice", dict(top_k=1, capacity_factor=1.5)),
    ("top_p", dict(top_k=3, capacity_factor=0.75, top_p=0.5)),
])
def test_last_decisions_equal_a_recount_from_the_router(router, options):
    moe = tm.nn.MoE(D, 8, E, router=router, dtype="float64", seed=3, **options)
    assert moe.last_decisions is None                                  # nothing before the first forward
    x = np.random.default_rng(7).standard_normal((2, T // 2, D))
    with tm.kernels.use("numpy"):
        moe(tm.tensor(x, dtype="float64"))
    expert_ids, kept = moe.last_decisions
    ids_expected, kept_expected = expected_decisions(router, x.reshape(T, D), moe.router.weight.numpy(),
                                                     options["top_k"], options["capacity_factor"],
                                                     options.get("top_p"))
    np.testing.assert_array_equal(np.asarray(expert_ids), ids_expected)
    np.testing.assert_array_equal(kept, kept_expected)
    assert kept.dtype == bool and kept.any() and not kept.all()        # capacity (or selection) really drops
    np.testing.assert_array_equal(kept.sum(axis=0) if router == "expert_choice" else
                                  np.bincount(np.asarray(expert_ids)[kept], minlength=E),
                                  moe.stats.kept_per_expert)
    state_ids, state_kept = moe_decisions(moe)()                       # the testing helper reads them
    np.testing.assert_array_equal(state_ids, ids_expected)
    np.testing.assert_array_equal(state_kept, kept_expected)
