"""router="relu" (ReMoE, Wang et al. 2025): gates relu(x Wᵀ), every expert with a positive gate, no top-k; the
λ-weighted L1 penalty and its controller λ ← λ·α^sign(target − sparsity); gradchecks in float64; the layer
against a plain per-token loop."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.nn.adaptive_gating import ReLUGate
from tinymoe.nn.adaptive_losses import ReLUSparsityLoss
from tinymoe.nn.moe_config import MoEConfig

D_MODEL, D_FF, N_EXPERTS = 6, 5, 5


def loop_relu(params, x):
    logits = ref.router_logits(params, x)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(N_EXPERTS):
            gate = max(logits[t, e], 0.0)
            if gate > 0:
                y[t] += gate * ref.expert_output(params, "swiglu", e, x[t])
    return y, logits


def test_layer_matches_the_plain_loop(device):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, router="relu", device=device)
    x = inputs((12, D_MODEL), device=device)
    y = moe(x)
    expected_y, logits = loop_relu(ref.parameters(moe), host(x))
    np.testing.assert_allclose(host(y), expected_y, rtol=1e-12, atol=1e-12)
    active = logits > 0
    np.testing.assert_array_equal(moe.stats.kept_per_expert, active.sum(axis=0))  # rows only for positive gates
    np.testing.assert_array_equal(moe.stats.experts_per_token_histogram,
                                  np.bincount(active.sum(axis=1), minlength=N_EXPERTS + 1))
    l1 = 1e-8 * np.maximum(logits, 0).sum() / 12
    assert float(host(moe.l1_loss)) == pytest.approx(l1, rel=1e-12)


def test_gate_and_l1_gradcheck():
    logits = inputs((7, N_EXPERTS), seed=5, scale=2.0)
    assert tm.gradcheck(lambda z: ReLUGate.apply(z)[:2], [logits])
    assert tm.gradcheck(lambda z: ReLUSparsityLoss.apply(z, 0.3), [logits])


def test_layer_gradcheck(device):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, router="relu", device=device, l1_coefficient=0.5).eval()  # λ fixed
    x = inputs((8, D_MODEL), device=device)

    def outputs(*_):
        return moe(x), moe.aux_loss, moe.l1_loss

    with fast_kernels(device):
        assert tm.gradcheck(outputs, [x, *moe.parameters()], discrete=tm.testing.moe_decisions(moe, x))


def test_l1_coefficient_follows_the_remoe_rule():
    """Each training forward: S = fraction of zero gates; λ ← λ · 1.2^sign(target − S); a plain loop replays it."""
    moe = layer(D_MODEL, D_FF, N_EXPERTS, router="relu", target_sparsity=0.5).train()
    expected, history = 1e-8, []
    for step in range(6):
        x = inputs((10, D_MODEL), seed=step)
        moe(x)
        logits = ref.router_logits(ref.parameters(moe), host(x))
        sparsity = float((logits <= 0).mean())
        history.append(sparsity)
        expected *= 1.2 ** np.sign(0.5 - sparsity)
        assert float(host(moe.router.l1_coefficient)) == pytest.approx(expected, rel=1e-14)
    assert moe.router.last_sparsity == pytest.approx(history[-1])


def test_default_target_is_one_minus_k_over_e_and_eval_does_not_update():
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=2, router="relu")
    assert moe.router.target_sparsity == pytest.approx(1 - 2 / N_EXPERTS)
    moe.eval()
    moe(inputs((4, D_MODEL)))
    assert float(host(moe.router.l1_coefficient)) == 1e-8
    with pytest.raises(RuntimeError, match="training-mode forward"):
        moe.update_l1_coefficient()


def test_deferred_updates_use_the_summed_gates():
    """defer_updates (gradient accumulation): forwards only add (active, total); one update uses their sum."""
    moe = layer(D_MODEL, D_FF, N_EXPERTS, router="relu", target_sparsity=0.55).train()
    moe.router.defer_updates = True
    active = total = 0
    for step in range(3):
        x = inputs((6, D_MODEL), seed=10 + step)
        moe(x)
        logits = ref.router_logits(ref.parameters(moe), host(x))
        active, total = active + int((logits > 0).sum()), total + logits.size
    assert float(host(moe.router.l1_coefficient)) == 1e-8  # not updated yet
    new = moe.update_l1_coefficient()
    assert new == pytest.approx(1e-8 * 1.2 ** np.sign(0.55 - (1 - active / total)), rel=1e-14)
    assert moe.router.pending_gates is None


def test_l1_coefficient_is_saved_in_the_state_dict():
    moe = layer(D_MODEL, D_FF, N_EXPERTS, router="relu").train()
    moe(inputs((4, D_MODEL)))
    assert float(host(moe.state_dict()["router.l1_coefficient"])) == float(host(moe.router.l1_coefficient))


@pytest.mark.parametrize("options,message", [
    (dict(router="softmax", target_sparsity=0.5), "apply to router='relu' only"),
    (dict(router="relu", target_sparsity=1.0), "target_sparsity=1.0"),
    (dict(router="relu", l1_update_factor=1.0), "l1_update_factor=1.0 must be greater than 1"),
    (dict(router="relu", l1_coefficient=-1.0), "l1_coefficient=-1.0"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(d_model=4, d_ff=4, n_experts=4, **options)
