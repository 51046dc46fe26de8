"""GPT-OSS: router bias (logits x Wᵀ + b), gated experts with biases and the clamped SwiGLU
(h = (clip(up, ±L) + 1) · g·σ(α g), g = min(gate, L)); the op and the layer against plain loops and torch,
gradchecked (with the clamps active), and equal to transformers' GptOssMLP on its fused interleaved weights."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.functional.gated_experts import gated_experts_unchecked
from tinymoe.nn import MoE, MoEConfig
from tinymoe.testing import moe_decisions

D_MODEL, D_FF, N_EXPERTS, TOP_K, ALPHA, LIMIT = 6, 5, 8, 2, 1.702, 1.0
OPTIONS = dict(router_bias=True, expert_bias=True, activation="swiglu_clamped", swiglu_limit=LIMIT)


def clamped_expert(params, e, x_t, alpha=ALPHA, limit=LIMIT):
    gate = min_elementwise(params["experts.w1"][e] @ x_t + params["experts.b1"][e], limit)
    up = np.clip(params["experts.w3"][e] @ x_t + params["experts.b3"][e], -limit, limit)
    return params["experts.w2"][e] @ ((up + 1) * gate * ref.sigmoid(alpha * gate)) + params["experts.b2"][e]


def min_elementwise(values, limit):
    return np.array([v if v < limit else limit for v in values])


def gpt_oss_loop(params, x):
    """Per token: z = W x + b; ids = top-k of z; weights = softmax over the k chosen logits; Σ w · expert."""
    y = np.zeros_like(x)
    for t, x_t in enumerate(x):
        z = params["router.weight"] @ x_t + params["router.logit_bias"]
        ids = ref.top_k(z, TOP_K)
        weights = ref.softmax(z[ids])
        for w, e in zip(weights, ids):
            y[t] += w * clamped_expert(params, e, x_t)
    return y


def randomized_layer(device="cpu", **options):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, device=device, **{**OPTIONS, **options})
    set_parameter(moe.router.logit_bias, np.random.default_rng(9).normal(0, 1.0, N_EXPERTS))
    return moe


def test_layer_matches_a_plain_loop_with_the_clamps_active(device):
    moe = randomized_layer(device)
    x = inputs((16, D_MODEL), device=device, requires_grad=False, scale=2.0)
    params = ref.parameters(moe)
    gates = np.einsum("efd,td->etf", params["experts.w1"], host(x)) + params["experts.b1"][:, None]
    ups = np.einsum("efd,td->etf", params["experts.w3"], host(x)) + params["experts.b3"][:, None]
    assert (gates > LIMIT).any() and (ups > LIMIT).any() and (ups < -LIMIT).any()  # every clamp side is used
    with fast_kernels(device):
        out = moe(x)
    np.testing.assert_allclose(host(out), gpt_oss_loop(params, host(x)), rtol=1e-12, atol=1e-12)


def test_normalize_top_k_is_the_softmax_over_the_top_k_logits():
    moe = randomized_layer()
    x = inputs((12, D_MODEL), requires_grad=False)
    routing = moe.router(x)
    z = host(x) @ host(moe.router.weight).T + host(moe.router.logit_bias)
    for t in range(12):
        ids = ref.top_k(z[t], TOP_K)
        np.testing.assert_array_equal(host(routing.expert_ids)[t], ids)
        np.testing.assert_allclose(host(routing.weights)[t], ref.softmax(z[t, ids]), rtol=1e-13)


def test_plain_swiglu_with_expert_bias_matches_a_loop():
    moe = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, expert_bias=True)
    params = ref.parameters(moe)
    x = host(inputs((10, D_MODEL), requires_grad=False))
    expected = np.zeros_like(x)
    for t, x_t in enumerate(x):
        p = ref.softmax(params["router.weight"] @ x_t)
        ids = ref.top_k(p, TOP_K)
        for w, e in zip(p[ids] / p[ids].sum(), ids):
            h = ref.silu(params["experts.w1"][e] @ x_t + params["experts.b1"][e]) * (
                params["experts.w3"][e] @ x_t + params["experts.b3"][e])
            expected[t] += w * (params["experts.w2"][e] @ h + params["experts.b2"][e])
    np.testing.assert_allclose(host(moe(tm.tensor(x, dtype="float64"))), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation, biases", [("swiglu_clamped", True), ("swiglu_clamped", False),
                                                ("swiglu", True)])
def test_gated_experts_op_gradcheck(activation, biases):
    rng = np.random.default_rng(0)
    t = lambda *shape: tm.tensor(rng.normal(0, 0.9, shape), dtype="float64", requires_grad=True)  # noqa: E731
    xs, w1, w3, w2 = t(9, D_MODEL), t(3, D_FF, D_MODEL), t(3, D_FF, D_MODEL), t(3, D_MODEL, D_FF)
    b1, b3, b2 = (t(3, D_FF), t(3, D_FF), t(3, D_MODEL)) if biases else (None, None, None)
    offsets = (0, 4, 4, 9)  # expert 1 idle: its gradients must be zero
    args = [a for a in (xs, w1, b1, w3, b3, w2, b2) if a is not None]
    op = lambda *_: gated_experts_unchecked(xs, w1, b1, w3, b3, w2, b2, offsets, activation, ALPHA, LIMIT)  # noqa
    assert tm.gradcheck(op, args)
    op().sum().backward()
    assert not host(w1.grad)[1].any() and not host(w2.grad)[1].any()


def test_clamp_gradient_matches_torch_including_the_boundary():
    torch = pytest.importorskip("torch")
    from tinymoe.engine.array_math import clamped_swiglu_with_derivative
    gate = np.array([-3.0, -0.5, 0.3, LIMIT, 1.5, 0.7, LIMIT])
    up = np.array([-2.0, -LIMIT, 0.2, 0.4, 3.0, LIMIT, -0.3])
    out, d_gate, d_up = clamped_swiglu_with_derivative(gate, up, ALPHA, LIMIT)
    g, u = torch.tensor(gate, requires_grad=True), torch.tensor(up, requires_grad=True)
    gc, uc = g.clamp(max=LIMIT), u.clamp(-LIMIT, LIMIT)
    expected = (uc + 1) * gc * torch.sigmoid(gc * ALPHA)
    expected.sum().backward()
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(d_gate, g.grad.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(d_up, u.grad.numpy(), rtol=1e-13, atol=1e-15)
    assert d_gate[4] == 0 and d_up[4] == 0 and d_up[0] == 0 and d_gate[3] != 0 and d_up[5] != 0


def test_layer_gradcheck(device):
    moe = randomized_layer(device)
    x = inputs((8, D_MODEL), device=device, scale=2.0)
    assert {"router.logit_bias", "experts.b1", "experts.b3", "experts.b2"} <= dict(moe.named_parameters()).keys()
    with fast_kernels(device):
        assert tm.gradcheck(lambda *_: moe(x), [x, *moe.parameters()], discrete=moe_decisions(moe, x))


@pytest.mark.parametrize("options, match", [
    (dict(expert_bias=True, activation="gelu"), "expert_bias"),
    (dict(swiglu_limit=3.0), "swiglu_clamped"),
    (dict(activation="swiglu_clamped", swiglu_limit=-1.0), "swiglu_limit"),
    (dict(activation="swiglu_clamped", swiglu_alpha=float("nan")), "swiglu_alpha"),
    (dict(router_bias=True, router="noisy"), "router_bias"),
])
def test_bad_gpt_oss_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(d_model=6, d_ff=5, n_experts=8, **options)


def test_matches_transformers_gpt_oss_mlp():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    config = GptOssConfig(hidden_size=D_MODEL, intermediate_size=D_FF, num_local_experts=N_EXPERTS,
                          num_experts_per_tok=TOP_K, swiglu_limit=LIMIT)
    block = modeling.GptOssMLP(config).double().eval()
    rng = np.random.default_rng(0)
    state = {key: rng.normal(0, 1.5 if key.startswith("router") else 0.6, tuple(value.shape))
             for key, value in block.state_dict().items()}
    with torch.no_grad():
        for key, value in block.state_dict().items():
            value.copy_(torch.from_numpy(state[key]))
    moe = MoE(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, dtype="float64", seed=0, **OPTIONS)
    gate_up, gate_up_bias = state["experts.gate_up_proj"], state["experts.gate_up_proj_bias"]  # (E, d, 2I), (E, 2I)
    for name, value in {"router.weight": state["router.weight"], "router.logit_bias": state["router.bias"],
                        "experts.w1": gate_up[:, :, 0::2].transpose(0, 2, 1), "experts.b1": gate_up_bias[:, 0::2],
                        "experts.w3": gate_up[:, :, 1::2].transpose(0, 2, 1), "experts.b3": gate_up_bias[:, 1::2],
                        "experts.w2": state["experts.down_proj"].transpose(0, 2, 1),
                        "experts.b2": state["experts.down_proj_bias"]}.items():
        set_parameter(dict(moe.named_parameters())[name], value)
    x = 2.0 * np.random.default_rng(5).standard_normal((2, 12, D_MODEL))
    with torch.no_grad():
        expected, _ = block(torch.from_numpy(x))
    # GPT-OSS routes in the input's dtype (float64 here), so the match is to round-off
    np.testing.assert_allclose(host(moe(tm.tensor(x, dtype="float64"))), expected.numpy(), rtol=1e-11, atol=1e-12)
