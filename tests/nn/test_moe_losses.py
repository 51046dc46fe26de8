"""Auxiliary losses by formula: the load-balance loss (Switch Transformer eq. 4–6 generalised to top-k, exactly 1 when
balanced, gradient through P only) and the router z-loss (ST-MoE), values and gradients, for every router."""
import numpy as np
import pytest

import moe_reference as ref
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.engine.backend import to_device

N_EXPERTS = 4


def balanced_batch(top_k):
    """Router weight I and tokens a·onehot(e) (+ b·onehot(e+1) for k = 2), each e twice: every expert is the first
    choice of 2 of the 8 tokens (and the second choice of 2), and by symmetry mean_t p_te = 1/E exactly."""
    rows = []
    for _ in range(2):
        for e in range(N_EXPERTS):
            row = np.zeros(N_EXPERTS)
            row[e] = 3.0
            if top_k == 2:
                row[(e + 1) % N_EXPERTS] = 1.5
            rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "capacity"])
@pytest.mark.parametrize("router", ["softmax", "noisy"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_perfectly_balanced_routing_gives_aux_loss_exactly_one(device, top_k, router, capacity_factor):
    moe = layer(d_model=N_EXPERTS, n_experts=N_EXPERTS, top_k=top_k, router=router,
                capacity_factor=capacity_factor, device=device).eval()
    set_parameter(moe.router.weight, np.eye(N_EXPERTS))
    x = inputs((8, N_EXPERTS), device=device)
    x.data[:] = x.xp.asarray(balanced_batch(top_k))
    expected = ref.token_choice(ref.parameters(moe), host(x), top_k)
    np.testing.assert_allclose(expected["probs"].mean(axis=0), 1 / N_EXPERTS, rtol=1e-14)  # P uniform
    np.testing.assert_array_equal(expected["requested_per_expert"], [2 * top_k] * N_EXPERTS)  # f uniform
    with fast_kernels(device):
        moe(x)
    assert float(host(moe.aux_loss)) == pytest.approx(1.0, rel=1e-12)
    if capacity_factor is not None:  # f counts the assignments that chose e, before capacity
        assert moe.stats.dropped_fraction > 0


def test_aux_loss_of_a_collapsed_router_approaches_E(device):
    moe = layer(d_model=N_EXPERTS, n_experts=N_EXPERTS, top_k=1, device=device)
    set_parameter(moe.router.weight, 20.0 * np.eye(N_EXPERTS))
    x = inputs((8, N_EXPERTS), device=device)
    x.data[:] = x.xp.asarray(np.tile([1.0, 0, 0, 0], (8, 1)))
    with fast_kernels(device):
        moe(x)
    assert float(host(moe.aux_loss)) == pytest.approx(N_EXPERTS, rel=1e-6)


def logits_and_input(moe, x):
    return host(x) @ ref.parameters(moe)["router.weight"].T, host(x)


AUX_CASES = [
    dict(router="softmax", top_k=1),
    dict(router="softmax", top_k=2),
    dict(router="softmax", top_k=3, capacity_factor=0.5),
    dict(router="softmax", top_k=2, normalize_top_k=False, capacity_factor=0.75),
    dict(router="noisy", top_k=2),
]


@pytest.mark.parametrize("options", AUX_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_aux_loss_value_and_gradient_through_P_only(device, options):
    """aux = E · Σ_e f_e · P_e with f from the T·k assignments (before capacity); d aux/dz has f held fixed."""
    moe = layer(n_experts=N_EXPERTS, device=device, **options).eval()
    x = inputs((2, 5, 6), device=device)
    with fast_kernels(device):
        moe(x)
        moe.aux_loss.backward()
    z, xs = logits_and_input(moe, x.reshape(10, 6))
    expected = ref.token_choice(ref.parameters(moe), xs, options["top_k"])
    assert float(host(moe.aux_loss)) == pytest.approx(ref.aux_loss(expected["probs"], expected["expert_ids"]),
                                                      rel=1e-12)
    grad_z = ref.aux_loss_logit_grad(z, expected["expert_ids"])
    weight = ref.parameters(moe)["router.weight"]
    np.testing.assert_allclose(host(moe.router.weight.grad), grad_z.T @ xs, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(host(x.grad).reshape(10, 6), grad_z @ weight, rtol=1e-10, atol=1e-13)
    for name in ("w1", "w2", "w3"):  # the loss does not reach the experts
        grad = getattr(moe.experts, name).grad
        assert grad is None or not host(grad).any()


def test_sigmoid_aux_loss_uses_the_normalised_affinities(device):
    """For the sigmoid router P_e = mean_t s_te / Σ_e' s_te' (DeepSeek-V3's normalised affinities) and f counts
    the biased selection; d aux/dz_te = (E/T) · σ'(z_te) / S_t · (f_e − Σ_e' f_e' q_te'), q = s/S."""
    moe = layer(router="sigmoid", n_experts=N_EXPERTS, top_k=2, device=device)
    bias = np.array([0.3, -0.2, 0.0, 0.1])
    moe.router.bias = to_device(bias, device)
    x = inputs((10, 6), device=device)
    with fast_kernels(device):
        moe(x)
        moe.aux_loss.backward()
    z, xs = logits_and_input(moe, x)
    expected = ref.token_choice(ref.parameters(moe), xs, 2, gate="sigmoid", bias=bias)
    s = ref.sigmoid(z)
    q = s / s.sum(axis=1, keepdims=True)
    assert float(host(moe.aux_loss)) == pytest.approx(ref.aux_loss(q, expected["expert_ids"]), rel=1e-12)
    f = np.bincount(expected["expert_ids"].reshape(-1), minlength=N_EXPERTS) / expected["expert_ids"].size
    grad_z = (N_EXPERTS / 10) * s * (1 - s) / s.sum(axis=1, keepdims=True) * (f - (q * f).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(host(moe.router.weight.grad), grad_z.T @ xs, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid", "expert_choice"])
def test_z_loss_is_mean_squared_logsumexp_with_its_gradient(device, router):
    options = dict(capacity_factor=1.0) if router == "expert_choice" else {}
    moe = layer(router=router, n_experts=N_EXPERTS, device=device, **options).eval()
    x = inputs((3, 4, 6), device=device)
    with fast_kernels(device):
        moe(x)
        moe.z_loss.backward()
    z, xs = logits_and_input(moe, x.reshape(12, 6))
    assert float(host(moe.z_loss)) == pytest.approx(ref.z_loss(z), rel=1e-12)
    grad_z = ref.z_loss_logit_grad(z)
    np.testing.assert_allclose(host(moe.router.weight.grad), grad_z.T @ xs, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(host(x.grad).reshape(12, 6), grad_z @ ref.parameters(moe)["router.weight"],
                               rtol=1e-10, atol=1e-13)


def test_z_loss_at_logits_of_1e4_is_finite_and_exact(device):
    moe = layer(d_model=N_EXPERTS, n_experts=N_EXPERTS, device=device)
    set_parameter(moe.router.weight, 1e4 * np.eye(N_EXPERTS))
    x = inputs((4, N_EXPERTS), device=device)
    x.data[:] = x.xp.asarray(np.eye(N_EXPERTS) - 0.5)  # logits ±5e3 in every row
    with fast_kernels(device):
        moe(x)
        moe.z_loss.backward()
    z = host(x) @ (1e4 * np.eye(N_EXPERTS)).T
    assert float(host(moe.z_loss)) == pytest.approx(ref.z_loss(z), rel=1e-12)
    assert np.isfinite(host(moe.router.weight.grad)).all() and np.isfinite(host(x.grad)).all()


def test_losses_are_scalars_that_follow_the_last_forward(device):
    moe = layer(device=device)
    assert moe.stats is None
    for name in ("aux_loss", "z_loss", "importance_loss", "load_loss"):
        with pytest.raises(RuntimeError, match=rf"MoE\.{name} is set by a forward; call the layer first"):
            getattr(moe, name)
    with fast_kernels(device):
        moe(inputs((6, 6), seed=1, device=device))
        first = float(host(moe.z_loss))
        moe(inputs((9, 6), seed=2, device=device))
    assert moe.aux_loss.shape == () and moe.z_loss.shape == ()
    assert float(host(moe.z_loss)) != first
    assert moe.importance_loss is None and moe.load_loss is None  # those belong to router="noisy"
