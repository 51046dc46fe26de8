"""DeepSeek-V3 routing: group-limited top-k (n_groups, topk_groups), routed_scaling_factor, the sigmoid router's
bias loaded from e_score_correction_bias; against a plain per-token loop, gradchecked, and equal to transformers'
DeepseekV3MoE on the same weights (its router computes in float32: ~1e-7)."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.engine.backend import to_device
from tinymoe.nn import MoE, MoEConfig
from tinymoe.testing import moe_decisions

D_MODEL, D_FF, N_EXPERTS, TOP_K, N_GROUPS, TOPK_GROUPS, SCALE = 6, 5, 8, 2, 4, 2, 2.5
OPTIONS = dict(router="sigmoid", n_groups=N_GROUPS, topk_groups=TOPK_GROUPS, routed_scaling_factor=SCALE,
               n_shared_experts=1)


def group_limited_loop(params, x, gate, bias, normalize, scale):
    """Per token: selection scores c (σ(z) + bias, or p = softmax(z)); group score = top-1 + top-2 of c within
    the group; keep the TOPK_GROUPS best groups; top-k of c among their experts; weights from the unbiased
    scores (/ (Σ + 1e-20) when normalize), times scale. y = Σ w · expert + shared."""
    z = x @ params["router.weight"].T
    size = N_EXPERTS // N_GROUPS
    y, chosen_ids, plain_ids = np.zeros_like(x), [], []
    for t in range(x.shape[0]):
        scores = ref.sigmoid(z[t]) if gate == "sigmoid" else ref.softmax(z[t])
        choice = scores + bias if gate == "sigmoid" else scores
        group_scores = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in range(N_GROUPS)]
        best = ref.top_k(np.array(group_scores), TOPK_GROUPS)
        eligible = np.array([e // size in best for e in range(N_EXPERTS)])
        ids = ref.top_k(np.where(eligible, choice, -np.inf), TOP_K)
        weights = scores[ids] / (scores[ids].sum() + 1e-20) if normalize else scores[ids]
        weights = weights * scale
        y[t] = ref.shared_output(params, x[t])
        for weight, e in zip(weights, ids):
            y[t] += weight * ref.expert_output(params, "swiglu", e, x[t])
        chosen_ids.append(ids)
        plain_ids.append(ref.top_k(choice, TOP_K))
    return y, np.array(chosen_ids), np.array(plain_ids)


def deepseek_layer(device="cpu", dtype="float64", seed=0, **options):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, dtype=dtype, device=device, seed=seed, **{**OPTIONS, **options})
    if moe.router.kind == "sigmoid":
        moe.router.bias = to_device(np.random.default_rng(seed + 3).normal(0, 0.4, N_EXPERTS), device)
    return moe


@pytest.mark.parametrize("gate, normalize", [("sigmoid", True), ("sigmoid", False), ("softmax", True)])
def test_group_limited_routing_matches_a_plain_loop(device, gate, normalize):
    moe = deepseek_layer(device, router=gate, normalize_top_k=normalize)
    x = inputs((24, D_MODEL), device=device, requires_grad=False)
    params = ref.parameters(moe)
    bias = params.get("router.bias", np.zeros(N_EXPERTS))
    expected, chosen, plain = group_limited_loop(params, host(x), gate, bias, normalize, SCALE)
    with fast_kernels(device):
        out = moe(x)
    np.testing.assert_allclose(host(out), expected, rtol=1e-12, atol=1e-12)
    # teeth: the group limit changed some token's experts (plain top-k would have picked others)
    assert (np.sort(chosen, axis=1) != np.sort(plain, axis=1)).any()


def test_defaults_are_ungrouped_and_unscaled():
    config = MoEConfig(d_model=6, d_ff=5, n_experts=8)
    assert (config.n_groups, config.topk_groups, config.routed_scaling_factor) == (1, None, 1.0)
    moe = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, router="sigmoid", n_groups=4, topk_groups=4)
    plain = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, router="sigmoid")
    x = inputs((16, D_MODEL), requires_grad=False)
    np.testing.assert_array_equal(host(moe(x)), host(plain(x)))  # all groups eligible = no limit


def test_routed_scaling_factor_scales_the_routed_part_only():
    x = inputs((10, D_MODEL), requires_grad=False)
    base = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, router="softmax", n_shared_experts=1)
    scaled = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, router="softmax", n_shared_experts=1, routed_scaling_factor=3.0)
    shared = host(base.shared(x))
    np.testing.assert_allclose(host(scaled(x)) - shared, 3.0 * (host(base(x)) - shared), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_gradcheck_group_limited_layer(device, gate):
    moe = deepseek_layer(device, router=gate)
    x = inputs((10, D_MODEL), device=device)
    with fast_kernels(device):
        assert tm.gradcheck(lambda *_: moe(x), [x, *moe.parameters()], discrete=moe_decisions(moe, x))


@pytest.mark.parametrize("options, match", [
    (dict(n_groups=3), "divide"),
    (dict(n_groups=8), "at least 2"),
    (dict(n_groups=4, topk_groups=5), "topk_groups"),
    (dict(n_groups=4, topk_groups=1, top_k=3), "eligible"),
    (dict(n_groups=2, router="noisy"), "n_groups"),
    (dict(n_groups=2, router="expert_choice"), "n_groups"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(n_groups=0), "n_groups"),
])
def test_bad_group_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(d_model=6, d_ff=5, n_experts=8, **options)


def deepseek_state(seed=0):
    rng = np.random.default_rng(seed)
    return {"gate.weight": rng.normal(0, 1.5, (N_EXPERTS, D_MODEL)),
            "gate.e_score_correction_bias": rng.normal(0, 0.3, N_EXPERTS),
            "experts.gate_up_proj": rng.normal(0, 0.5, (N_EXPERTS, 2 * D_FF, D_MODEL)),
            "experts.down_proj": rng.normal(0, 0.5, (N_EXPERTS, D_MODEL, D_FF)),
            "shared_experts.gate_proj.weight": rng.normal(0, 0.5, (D_FF, D_MODEL)),
            "shared_experts.up_proj.weight": rng.normal(0, 0.5, (D_FF, D_MODEL)),
            "shared_experts.down_proj.weight": rng.normal(0, 0.5, (D_MODEL, D_FF))}


def load_deepseek(moe, state):
    tm.io.load_mixtral(moe, {key: value for key, value in state.items() if not key.startswith("shared_experts.")})
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        set_parameter(getattr(moe.shared, ours), state[f"shared_experts.{theirs}.weight"])


def test_e_score_correction_bias_loads_into_the_router_bias():
    state = deepseek_state()
    moe = MoE(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, dtype="float64", seed=0, **OPTIONS)
    load_deepseek(moe, state)
    np.testing.assert_array_equal(host(moe.router.bias), state["gate.e_score_correction_bias"])
    softmax_layer = MoE(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, dtype="float64", seed=0)
    with pytest.raises(KeyError, match="e_score_correction_bias"):
        tm.io.load_mixtral(softmax_layer, {key: value for key, value in state.items()
                                    if not key.startswith("shared_experts.")})


def test_matches_transformers_deepseek_v3_moe():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(hidden_size=D_MODEL, moe_intermediate_size=D_FF, n_routed_experts=N_EXPERTS,
                              num_experts_per_tok=TOP_K, n_group=N_GROUPS, topk_group=TOPK_GROUPS,
                              n_shared_experts=1, routed_scaling_factor=SCALE, norm_topk_prob=True)
    block = modeling.DeepseekV3MoE(config).double().eval()
    state = deepseek_state()
    with torch.no_grad():
        for key, value in block.state_dict().items():
            value.copy_(torch.from_numpy(state[key]))
    moe = MoE(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, dtype="float64", seed=0, **OPTIONS)
    load_deepseek(moe, state)
    x = np.random.default_rng(5).standard_normal((2, 12, D_MODEL))
    with torch.no_grad():
        expected = block(torch.from_numpy(x)).numpy()
    ours = host(moe(tm.tensor(x, dtype="float64")))
    # transformers routes in float32 (same experts picked here: the gaps are far above float32 round-off)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
