"""Switch / GShard capacity groups: capacity_per="sequence" counts capacity per sequence of x (B, L, d); equal to
a plain loop applying the per-batch rule to each sequence on its own, different from the batch rule, gradchecked."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.nn import MoEConfig

D_MODEL, D_FF, N_EXPERTS, BATCH, LENGTH = 6, 5, 4, 3, 8
OPTIONS = dict(top_k=1, normalize_top_k=False, capacity_factor=1.0, capacity_per="sequence")


def skewed_input(device="cpu", requires_grad=False):
    """Sequence 0 leans on one direction, so its tokens crowd a few experts (batch vs sequence capacity differ)."""
    x = inputs((BATCH, LENGTH, D_MODEL), device=device, requires_grad=False)
    values = host(x).copy()
    values[0] += 2.0 * np.random.default_rng(3).standard_normal(D_MODEL)
    return tm.tensor(values, dtype="float64", device=device, requires_grad=requires_grad)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sequence_capacity_is_the_batch_rule_per_sequence(device, top_k):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, device=device, **{**OPTIONS, "top_k": top_k})
    x = skewed_input(device)
    params = ref.parameters(moe)
    per_sequence = [ref.token_choice(params, host(x)[b], top_k, normalize=False, capacity_factor=1.0)
                    for b in range(BATCH)]
    with fast_kernels(device):
        out = moe(x)
    np.testing.assert_allclose(host(out), np.stack([r["y"] for r in per_sequence]), rtol=1e-12, atol=1e-12)
    kept = np.concatenate([r["kept"] for r in per_sequence])
    assert moe.stats.dropped_fraction == pytest.approx(1 - kept.mean())
    batch_rule = ref.token_choice(params, host(x).reshape(-1, D_MODEL), top_k, normalize=False, capacity_factor=1.0)
    assert (batch_rule["kept"] != kept).any()  # teeth: per-sequence groups keep other assignments


def test_default_is_the_batch_rule():
    assert MoEConfig(d_model=6, d_ff=5, n_experts=4).capacity_per == "batch"
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=1, normalize_top_k=False, capacity_factor=1.0)
    x = skewed_input()
    expected = ref.token_choice(ref.parameters(moe), host(x).reshape(-1, D_MODEL), 1, normalize=False,
                                capacity_factor=1.0)["y"]
    np.testing.assert_allclose(host(moe(x)).reshape(-1, D_MODEL), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_sequence_capacity(device):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, device=device, **{**OPTIONS, "top_k": 2})
    x = skewed_input(device, requires_grad=True)

    def decisions(*_):  # the routing and the per-sequence kept set, recomputed by the plain loop
        params = ref.parameters(moe)
        runs = [ref.token_choice(params, host(x)[b], 2, normalize=False, capacity_factor=1.0) for b in range(BATCH)]
        return tuple(np.concatenate([r[key] for r in runs]) for key in ("expert_ids", "kept"))

    with fast_kernels(device):
        moe(x)
        assert moe.stats.dropped_fraction > 0
        assert tm.gradcheck(lambda *_: moe(x), [x, *moe.parameters()], discrete=decisions)


def test_sequence_capacity_needs_sequences_and_a_capacity():
    moe = layer(D_MODEL, D_FF, N_EXPERTS, **OPTIONS)
    with pytest.raises(ValueError, match="capacity_per='sequence'"):
        moe(inputs((D_MODEL,), requires_grad=False))
    for options in (dict(capacity_per="sequence"), dict(capacity_per="sequence", router="expert_choice",
                                                         capacity_factor=1.0)):
        with pytest.raises(ValueError, match="capacity_per"):
            MoEConfig(d_model=6, d_ff=5, n_experts=4, **options)
    with pytest.raises(ValueError, match="capacity_per"):
        MoEConfig(d_model=6, d_ff=5, n_experts=4, capacity_factor=1.0, capacity_per="token")
