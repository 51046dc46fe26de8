"""MoETransformer.loss adds the adaptive routers' terms: entropy_coef · H(p) for router='top_p' (Huang et al.
2024) and the λ-weighted L1 of the gates for router='relu' (ReMoE). Oracles: the same model (same seed) with
another coefficient, the sum of the parts written out, and MoEStats' own entropy of the router distribution."""
import numpy as np
import pytest

from tinymoe.models import MoETransformer, TransformerConfig

VOCAB, LENGTH = 11, 8
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (3, LENGTH + 1))


def model(moe, **options):
    config = TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=LENGTH,
                               moe={"d_ff": 12, "n_experts": 4, "top_k": 2, **moe}, dtype="float64", **options)
    return MoETransformer(config, seed=0)


def loss(net):
    return net.loss(TOKENS[:, :-1], TOKENS[:, 1:])


def weighted_router_losses(net):
    c = net.config
    return sum(c.aux_coef * float(layer.aux_loss.item()) + c.z_coef * float(layer.z_loss.item())
               for layer in net.moe_layers())


def test_entropy_term_of_the_top_p_router():
    plain, weighted = model({"router": "top_p", "top_p": 0.5}), model({"router": "top_p", "top_p": 0.5},
                                                                      entropy_coef=0.3)
    total_plain, parts_plain = loss(plain)
    total, parts = loss(weighted)
    entropies = [float(layer.entropy_loss.item()) for layer in weighted.moe_layers()]
    # MoEStats computes −Σ p log p from the router's probabilities on its own
    np.testing.assert_allclose(entropies, [layer.stats.router_entropy for layer in weighted.moe_layers()], rtol=1e-12)
    assert min(entropies) > 0.5  # a near-uniform router over 4 experts: H close to log 4
    np.testing.assert_allclose(parts["total"] - parts_plain["total"], 0.3 * sum(entropies), rtol=1e-10)
    np.testing.assert_allclose(parts["total"], parts["cross_entropy"] + weighted_router_losses(weighted)
                               + 0.3 * sum(entropies), rtol=1e-12)
    total.backward()
    total_plain.backward()
    router, router_plain = weighted.blocks[0].ffn.router.weight.grad, plain.blocks[0].ffn.router.weight.grad
    assert np.abs(router - router_plain).max() > 1e-6  # the term reaches the router's gradient


def test_entropy_coef_is_ignored_by_other_routers_and_validated():
    softmax = model({}, entropy_coef=0.3)
    _, parts = loss(softmax)
    assert all(layer.entropy_loss is None for layer in softmax.moe_layers())
    np.testing.assert_allclose(parts["total"], parts["cross_entropy"] + weighted_router_losses(softmax), rtol=1e-12)
    with pytest.raises(ValueError, match="entropy_coef=-1.0 must be non-negative"):
        model({}, entropy_coef=-1.0)
    values = softmax.config.to_dict()
    assert values["entropy_coef"] == 0.3
    del values["entropy_coef"]  # configs written before the field existed
    assert TransformerConfig.from_dict(values).entropy_coef == 0.0


def test_l1_term_of_the_relu_router():
    small, large = model({"router": "relu", "l1_coefficient": 0.25}), model({"router": "relu", "l1_coefficient": 0.5})
    _, parts_small = loss(small)
    total, parts = loss(large)
    l1 = [float(layer.l1_loss.item()) for layer in large.moe_layers()]
    l1_small = [float(layer.l1_loss.item()) for layer in small.moe_layers()]
    assert min(l1) > 1e-3
    np.testing.assert_allclose(l1, 2 * np.array(l1_small), rtol=1e-12)  # λ · (the same gates)
    np.testing.assert_allclose(parts["total"], parts["cross_entropy"] + weighted_router_losses(large) + sum(l1),
                               rtol=1e-12)
    np.testing.assert_allclose(parts["total"] - parts_small["total"], sum(l1) / 2, rtol=1e-10)
