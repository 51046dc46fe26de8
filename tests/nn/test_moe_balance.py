"""balance="batch" | "sequence" | "global": the load-balance loss with f_e counted over the batch (Switch), per
sequence and averaged (DeepSeek-V3 eq. 17–20), or over every micro-batch of the step (Qiu et al. 2025, through
router.global_load); plain-loop references and float64 gradchecks; and experts_per_token for every router."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.nn.adaptive_losses import SequenceBalanceLoss
from tinymoe.nn.moe_config import MoEConfig

D_MODEL, D_FF, N_EXPERTS = 6, 5, 4
B, L = 3, 5


def chosen_ids(moe, x):
    """(T, K) chosen experts and the (T, K) slots used, from a plain loop over the layer's routing rule."""
    params, rows = ref.parameters(moe), host(x).reshape(-1, D_MODEL)
    logits = ref.router_logits(params, rows)
    kind, k = moe.router.kind, moe.top_k
    if kind == "sigmoid":
        scores = ref.sigmoid(logits)
        ids = [ref.top_k(scores[t] + params["router.bias"], k) for t in range(len(rows))]
        probs = scores / scores.sum(axis=1, keepdims=True)
    else:
        probs = ref.softmax(logits)
        ids = [ref.top_k(probs[t], k) for t in range(len(rows))]
    return np.array(ids), probs


def loop_sequence_balance(ids, probs, n_outputs, length):
    """mean over sequences b of E · Σ_e f_be · P_be, f_be = share of b's assignments on e, P_be = mean p over b."""
    losses = []
    for start in range(0, len(ids), length):
        seq_ids, seq_probs = ids[start:start + length], probs[start:start + length]
        fraction = np.bincount(seq_ids.reshape(-1), minlength=n_outputs) / seq_ids.size
        losses.append(n_outputs * (fraction * seq_probs.mean(axis=0)).sum())
    return float(np.mean(losses))


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_sequence_balance_matches_the_plain_loop(device, router):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, router=router, balance="sequence", device=device)
    x = inputs((B, L, D_MODEL), device=device)
    moe(x)
    ids, probs = chosen_ids(moe, x)
    expected = loop_sequence_balance(ids, probs, N_EXPERTS, L)
    assert float(host(moe.aux_loss)) == pytest.approx(expected, rel=1e-12)
    batch = ref.aux_loss(probs, ids)
    assert abs(expected - batch) > 1e-3, "the case should tell the sequence loss from the batch loss"


def test_sequence_balance_of_one_sequence_is_the_batch_loss():
    x = inputs((1, 7, D_MODEL))
    per_sequence, per_batch = layer(balance="sequence"), layer(balance="batch")
    per_sequence(x), per_batch(x)
    assert float(host(per_sequence.aux_loss)) == pytest.approx(float(host(per_batch.aux_loss)), rel=1e-14)


def test_sequence_balance_with_top_p_counts_the_used_slots():
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=3, router="top_p", top_p=0.6, balance="sequence")
    x = inputs((B, L, D_MODEL))
    moe(x)
    probs = ref.softmax(ref.router_logits(ref.parameters(moe), host(x).reshape(-1, D_MODEL)))
    losses = []
    for b in range(B):
        chosen = []
        for t in range(b * L, (b + 1) * L):
            order, mass = sorted(range(N_EXPERTS), key=lambda e: (-probs[t, e], e)), 0.0
            for e in order[:3]:
                if chosen and mass >= 0.6 and e != order[0]:
                    break
                chosen.append(e)
                mass += probs[t, e]
        fraction = np.bincount(chosen, minlength=N_EXPERTS) / len(chosen)
        losses.append(N_EXPERTS * (fraction * probs[b * L:(b + 1) * L].mean(axis=0)).sum())
    assert float(host(moe.aux_loss)) == pytest.approx(np.mean(losses), rel=1e-12)


def test_sequence_balance_loss_gradcheck():
    probs = inputs((B * L, N_EXPERTS), seed=2)
    fractions = np.random.default_rng(3).dirichlet(np.ones(N_EXPERTS), size=B)
    assert tm.gradcheck(lambda p: SequenceBalanceLoss.apply(p, fractions), [probs])


@pytest.mark.parametrize("balance", ["sequence", "global"])
def test_layer_aux_gradcheck(device, balance):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, balance=balance, device=device)
    x = inputs((2, 4, D_MODEL), device=device)

    def aux(*_):
        moe(x)
        return moe.aux_loss

    with fast_kernels(device):
        assert tm.gradcheck(aux, [x, moe.router.weight], discrete=tm.testing.moe_decisions(moe, x))


def test_global_balance_uses_the_given_counts():
    moe = layer(balance="global")
    x = inputs((2, 4, D_MODEL))
    moe(x)
    ids, probs = chosen_ids(moe, x)
    assert float(host(moe.aux_loss)) == pytest.approx(ref.aux_loss(probs, ids), rel=1e-12)  # alone: the batch
    np.testing.assert_array_equal(moe.router.last_choice_counts, np.bincount(ids.reshape(-1), minlength=N_EXPERTS))
    counts = np.array([5, 0, 9, 2])
    moe.router.global_load = counts
    moe(x)
    expected = N_EXPERTS * (counts / counts.sum() * probs.mean(axis=0)).sum()
    assert float(host(moe.aux_loss)) == pytest.approx(expected, rel=1e-12)


def test_a_single_token_is_one_sequence():
    moe = layer(balance="sequence")
    moe(inputs((D_MODEL,)))
    ids, probs = chosen_ids(moe, inputs((D_MODEL,)))
    assert float(host(moe.aux_loss)) == pytest.approx(ref.aux_loss(probs, ids), rel=1e-12)


def test_bad_balance_is_refused():
    with pytest.raises(ValueError, match="balance='token' is not supported"):
        MoEConfig(d_model=4, d_ff=4, n_experts=4, balance="token")
    with pytest.raises(ValueError, match="balance='sequence' needs a token-choice router"):
        MoEConfig(d_model=4, d_ff=4, n_experts=4, router="expert_choice", balance="sequence")


# ----- experts_per_token for every router ----------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(router="softmax"), dict(router="noisy"), dict(router="sigmoid"),
                                     dict(router="softmax", capacity_factor=0.5)])
def test_token_choice_uses_k_experts_per_token(options):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=2, **options).eval()
    moe(inputs((9, D_MODEL)))
    assert moe.stats.experts_per_token == 2.0
    assert moe.stats.experts_per_token_histogram.tolist() == [0, 0, 9]


def test_expert_choice_counts_the_experts_that_took_each_token():
    moe = layer(D_MODEL, D_FF, N_EXPERTS, router="expert_choice", capacity_factor=1.0)
    x = inputs((8, D_MODEL))
    moe(x)
    probs = ref.softmax(ref.router_logits(ref.parameters(moe), host(x)))
    taken = np.zeros(8, dtype=int)
    for e in range(N_EXPERTS):
        for t in ref.top_k(probs[:, e], 2):  # C = ceil(1.0 · 8 / 4)
            taken[t] += 1
    np.testing.assert_array_equal(moe.stats.experts_per_token_histogram, np.bincount(taken, minlength=N_EXPERTS + 1))
    assert moe.stats.experts_per_token == pytest.approx(taken.mean())
