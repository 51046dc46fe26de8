"""Null experts (AdaMoE, Zeng et al. 2024): m extra router outputs whose experts compute nothing. A token's top-k
over E + m outputs may pick null experts, which cost no rows; weights are renormalised over all k chosen (null
included), so the null share simply drops out; the balance loss counts all E + m outputs."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.nn.moe_config import MoEConfig

D_MODEL, D_FF, N_EXPERTS, N_NULL = 6, 5, 4, 3


def loop_null(params, x, k, normalize=True):
    """Per token: p = softmax over E + m logits; top-k over all outputs; w = p_ids / Σ p_ids (normalize);
    y_t = Σ over the chosen REAL experts of w · expert(x_t)."""
    probs = ref.softmax(ref.router_logits(params, x))
    y, chosen = np.zeros_like(x), []
    for t in range(x.shape[0]):
        ids = ref.top_k(probs[t], k)
        total = sum(probs[t, e] for e in ids) if normalize else 1.0
        chosen.append(ids)
        for e in ids:
            if e < N_EXPERTS:
                y[t] += probs[t, e] / total * ref.expert_output(params, "swiglu", e, x[t])
    return y, probs, chosen


def null_layer(device="cpu", k=3, **options):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=k, n_null_experts=N_NULL, device=device, **options)
    weight = host(moe.router.weight).copy()
    weight[N_EXPERTS:] *= 0.5  # null outputs as likely as real ones, so tokens differ in how many they pick
    set_parameter(moe.router.weight, weight)
    return moe


@pytest.mark.parametrize("normalize", [True, False])
def test_layer_matches_the_plain_loop(device, normalize):
    moe = null_layer(device, normalize_top_k=normalize)
    assert moe.router.weight.shape == (N_EXPERTS + N_NULL, D_MODEL)
    x = inputs((16, D_MODEL), device=device)
    y = moe(x)
    params = ref.parameters(moe)
    expected_y, probs, chosen = loop_null(params, host(x), 3, normalize)
    np.testing.assert_allclose(host(y), expected_y, rtol=1e-12, atol=1e-12)
    real = np.array([sum(e < N_EXPERTS for e in ids) for ids in chosen])
    assert real.min() < real.max(), "the case should give tokens different numbers of real experts"
    np.testing.assert_array_equal(moe.stats.experts_per_token_histogram, np.bincount(real, minlength=4))
    assert moe.stats.experts_per_token == pytest.approx(real.mean())
    # no rows for null experts: only real assignments reach the experts
    load = np.bincount([e for ids in chosen for e in ids if e < N_EXPERTS], minlength=N_EXPERTS)
    np.testing.assert_array_equal(moe.stats.kept_per_expert, load)
    np.testing.assert_array_equal(moe.stats.requested_per_expert, load)
    # balance over all E + m outputs, f over the T·k assignments
    fraction = np.bincount(np.array(chosen).reshape(-1), minlength=N_EXPERTS + N_NULL) / (16 * 3)
    expected_aux = (N_EXPERTS + N_NULL) * (fraction * probs.mean(axis=0)).sum()
    assert float(host(moe.aux_loss)) == pytest.approx(expected_aux, rel=1e-12)


def test_a_token_routed_only_to_null_experts_gets_zero():
    moe = null_layer(k=2)
    weight = np.zeros((N_EXPERTS + N_NULL, D_MODEL))
    weight[N_EXPERTS:, 0] = 5.0  # feature 0 sends a token to the null experts
    set_parameter(moe.router.weight, weight)
    x = inputs((3, D_MODEL))
    x.data[0, 0] = 3.0
    x.data[1:, 0] = -3.0
    y = moe(x)
    np.testing.assert_array_equal(host(y)[0], 0.0)
    assert np.abs(host(y)[1:]).sum() > 0
    assert moe.stats.experts_per_token_histogram.tolist() == [1, 0, 2]


def test_layer_gradcheck(device):
    moe = null_layer(device)
    x = inputs((8, D_MODEL), device=device)

    def outputs(*_):
        return moe(x), moe.aux_loss, moe.z_loss

    with fast_kernels(device):
        assert tm.gradcheck(outputs, [x, *moe.parameters()], discrete=tm.testing.moe_decisions(moe, x))


def test_null_experts_with_capacity_drop_real_rows_only():
    moe = null_layer(capacity_factor=0.5)
    x = inputs((16, D_MODEL))
    moe(x)
    capacity = moe.router.capacity(16)
    assert (moe.stats.kept_per_expert <= capacity).all() and moe.stats.dropped_fraction > 0


def test_null_experts_refuse_group_routing_and_router_bias():
    with pytest.raises(ValueError, match="n_null_experts does not combine"):
        MoEConfig(d_model=4, d_ff=4, n_experts=4, n_null_experts=2, router_bias=True)


@pytest.mark.parametrize("router", ["noisy", "sigmoid", "expert_choice", "relu", "top_p"])
def test_other_routers_refuse_null_experts(router):
    top_p = 0.5 if router == "top_p" else None
    with pytest.raises(ValueError, match="n_null_experts=2 applies to router='softmax'"):
        MoEConfig(d_model=4, d_ff=4, n_experts=4, router=router, n_null_experts=2, top_p=top_p)
