"""router="top_p" (Huang et al. 2024, "Harder Tasks Need More Experts"): each token takes experts by probability
until their sum reaches top_p (1..top_k of them), raw p as weights; the entropy (dynamic) loss; gradchecks in
float64 of the gate, the loss and the whole layer; the layer against a plain per-token loop."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.nn.adaptive_gating import TopPGate
from tinymoe.nn.adaptive_losses import EntropyLoss
from tinymoe.nn.moe_config import MoEConfig

D_MODEL, D_FF, N_EXPERTS = 6, 5, 5


def loop_top_p(params, x, threshold, k, activation="swiglu"):
    """Per token: order experts by p (ties to the lower index), add them while the mass taken so far is below
    the threshold, at most k; y_t = Σ_chosen p_e · expert_e(x_t) (no renormalisation)."""
    logits = ref.router_logits(params, x)
    probs = ref.softmax(logits)
    chosen, y = [], np.zeros_like(x)
    for t in range(x.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda e: (-probs[t, e], e))
        taken, mass = [], 0.0
        for e in order:
            if len(taken) == k or (taken and mass >= threshold):
                break
            taken.append(e)
            mass += probs[t, e]
        chosen.append(taken)
        for e in taken:
            y[t] += probs[t, e] * ref.expert_output(params, activation, e, x[t])
    return y, probs, chosen


def loop_entropy(probs):
    return float(np.mean([-sum(p * np.log(p) for p in row if p > 0) for row in probs]))


@pytest.mark.parametrize("threshold,k", [(0.3, 3), (0.6, 3), (0.9, 4), (1.0, 2)])
def test_layer_matches_the_plain_loop(device, threshold, k):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=k, router="top_p", top_p=threshold, device=device)
    x = inputs((12, D_MODEL), device=device)
    y = moe(x)
    params, xs = ref.parameters(moe), host(x)
    expected_y, probs, chosen = loop_top_p(params, xs, threshold, k)
    np.testing.assert_allclose(host(y), expected_y, rtol=1e-12, atol=1e-12)
    counts = np.array([len(c) for c in chosen])
    assert counts.min() >= 1 and counts.max() <= k
    assert moe.stats.experts_per_token == pytest.approx(counts.mean(), abs=1e-12)
    np.testing.assert_array_equal(moe.stats.experts_per_token_histogram, np.bincount(counts, minlength=k + 1))
    # no rows for unused slots: the experts processed exactly the chosen assignments
    expected_load = np.bincount([e for c in chosen for e in c], minlength=N_EXPERTS)
    np.testing.assert_array_equal(moe.stats.kept_per_expert, expected_load)
    # aux over the chosen assignments, entropy loss = mean H(p)
    fraction = expected_load / expected_load.sum()
    assert float(host(moe.aux_loss)) == pytest.approx(N_EXPERTS * (fraction * probs.mean(axis=0)).sum(), rel=1e-12)
    assert float(host(moe.entropy_loss)) == pytest.approx(loop_entropy(probs), rel=1e-12)


def test_counts_vary_between_tokens():
    """The point of the router: a confident token takes one expert, an unsure one several."""
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=4, router="top_p", top_p=0.5)
    x = inputs((40, D_MODEL))
    moe(x)
    histogram = moe.stats.experts_per_token_histogram
    assert histogram[0] == 0 and histogram.sum() == 40 and (histogram > 0).sum() >= 2


@settings(max_examples=40, deadline=None)
@given(n_tokens=st.integers(1, 9), n_experts=st.integers(1, 6), data=st.data(),
       threshold=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_gate_matches_the_loop_for_any_shape(n_tokens, n_experts, data, threshold, seed):
    k = data.draw(st.integers(1, n_experts))
    z = np.random.default_rng(seed).normal(0, 2, (n_tokens, n_experts))
    _, weights, ids, valid = TopPGate.apply(tm.tensor(z, dtype="float64"), k, threshold)
    probs = ref.softmax(z)
    for t in range(n_tokens):
        order = sorted(range(n_experts), key=lambda e: (-probs[t, e], e))[:k]
        taken, mass = [], 0.0
        for e in order:
            if taken and mass >= threshold:
                break
            taken.append(e)
            mass += probs[t, e]
        used = host(ids)[t][host(valid)[t]].tolist()
        assert used == taken
        np.testing.assert_allclose(host(weights)[t][host(valid)[t]], probs[t, taken], rtol=1e-12)
        assert (host(weights)[t][~host(valid)[t]] == 0).all()


def test_gate_and_entropy_gradcheck():
    logits = inputs((7, N_EXPERTS), seed=3, scale=2.0)
    assert tm.gradcheck(lambda z: TopPGate.apply(z, 3, 0.6)[:2], [logits])
    assert tm.gradcheck(lambda z: EntropyLoss.apply(z), [logits])


def test_gradcheck_catches_a_gate_backward_off_by_one_percent(monkeypatch):
    logits = inputs((7, N_EXPERTS), seed=3, scale=2.0)
    right = TopPGate.backward
    monkeypatch.setattr(TopPGate, "backward", staticmethod(lambda ctx, *grads: 1.01 * right(ctx, *grads)))
    assert not tm.gradcheck(lambda z: TopPGate.apply(z, 3, 0.6)[:2], [logits], raise_exception=False)


def test_entropy_loss_backward_against_the_formula():
    """dH/dz_te = −p_te (z_te − Σ_j p_tj z_tj) / T, checked by central differences of the plain-loop entropy."""
    z = np.random.default_rng(4).normal(0, 2, (5, 4))
    logits = tm.tensor(z, dtype="float64", requires_grad=True)
    EntropyLoss.apply(logits).backward()
    eps, numeric = 1e-6, np.zeros_like(z)
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += eps
        down[index] -= eps
        numeric[index] = (loop_entropy(ref.softmax(up)) - loop_entropy(ref.softmax(down))) / (2 * eps)
    np.testing.assert_allclose(host(logits.grad), numeric, atol=1e-8)


def test_entropy_is_finite_for_huge_logits():
    logits = tm.tensor([[1e4, 0.0, -1e4]], dtype="float64", requires_grad=True)
    loss = EntropyLoss.apply(logits)
    loss.backward()
    assert float(host(loss)) == pytest.approx(0.0, abs=1e-300) and np.isfinite(host(logits.grad)).all()


def test_layer_gradcheck(device):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=3, router="top_p", top_p=0.6, device=device, n_shared_experts=1)
    x = inputs((8, D_MODEL), device=device)

    def outputs(*_):
        y = moe(x)
        return y, moe.aux_loss, moe.entropy_loss

    with fast_kernels(device):
        assert tm.gradcheck(outputs, [x, *moe.parameters()], discrete=tm.testing.moe_decisions(moe, x))


@pytest.mark.parametrize("options,message", [
    (dict(router="top_p"), "top_p=None"),
    (dict(router="softmax", top_p=0.5), "top_p=0.5"),
    (dict(router="top_p", top_p=0.0), "top_p=0.0"),
    (dict(router="top_p", top_p=1.5), "top_p=1.5"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(d_model=4, d_ff=4, n_experts=4, **options)


def test_other_routers_have_no_entropy_loss():
    moe = layer(D_MODEL, D_FF, N_EXPERTS)
    moe(inputs((3, D_MODEL)))
    assert moe.entropy_loss is None and moe.l1_loss is None
