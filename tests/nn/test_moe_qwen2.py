"""Qwen2-MoE's shared expert: its own width (shared_d_ff) and a sigmoid gate σ(x·w_gate); against a plain loop,
gradchecked, and equal to transformers' Qwen2MoeSparseMoeBlock (its router softmax runs in float32: ~1e-7)."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.nn import MoE, MoEConfig
from tinymoe.testing import moe_decisions

D_MODEL, D_FF, SHARED_D_FF, N_EXPERTS, TOP_K = 6, 5, 7, 8, 2
OPTIONS = dict(n_shared_experts=1, shared_d_ff=SHARED_D_FF, shared_expert_gate=True, normalize_top_k=False)


def gated_loop(params, x):
    """Routed part by moe_reference's token-choice loop; plus σ(w_gate · x_t) · shared(x_t) per token."""
    routed = ref.token_choice({k: v for k, v in params.items() if not k.startswith("shared")}, x, TOP_K,
                              normalize=False)["y"]
    gates = [ref.sigmoid(params["shared_gate"][0] @ x_t) for x_t in x]
    return routed + np.stack([g * ref.shared_output(params, x_t) for g, x_t in zip(gates, x)])


def test_gated_shared_expert_matches_a_plain_loop(device):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, device=device, **OPTIONS)
    assert moe.shared.w1.shape == (SHARED_D_FF, D_MODEL) and moe.shared_gate.shape == (1, D_MODEL)
    x = inputs((16, D_MODEL), device=device, requires_grad=False)
    with fast_kernels(device):
        out = moe(x)
    np.testing.assert_allclose(host(out), gated_loop(ref.parameters(moe), host(x)), rtol=1e-12, atol=1e-12)


def test_defaults_keep_the_ungated_n_times_d_ff_block():
    moe = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, n_shared_experts=2)
    assert moe.shared.d_ff == 2 * D_FF and "shared_gate" not in dict(moe.named_parameters())


def test_gradcheck_with_the_shared_gate(device):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, TOP_K, device=device, **OPTIONS)
    x = inputs((8, D_MODEL), device=device)
    with fast_kernels(device):
        assert tm.gradcheck(lambda *_: moe(x), [x, *moe.parameters()], discrete=moe_decisions(moe, x))


@pytest.mark.parametrize("options, match", [
    (dict(shared_expert_gate=True), "n_shared_experts"),
    (dict(shared_d_ff=4), "n_shared_experts"),
    (dict(n_shared_experts=1, shared_d_ff=0), "shared_d_ff"),
])
def test_bad_shared_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(d_model=6, d_ff=5, n_experts=8, **options)
    with pytest.raises(TypeError, match="shared_expert_gate"):
        MoEConfig(d_model=6, d_ff=5, n_experts=8, n_shared_experts=1, shared_expert_gate=1)


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_transformers_qwen2_moe_block(normalize):
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe")
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(hidden_size=D_MODEL, moe_intermediate_size=D_FF, num_experts=N_EXPERTS,
                            shared_expert_intermediate_size=SHARED_D_FF, num_experts_per_tok=TOP_K,
                            norm_topk_prob=normalize)
    block = modeling.Qwen2MoeSparseMoeBlock(config).double().eval()
    rng = np.random.default_rng(0)
    state = {key: rng.normal(0, 1.5 if key == "gate.weight" else 0.5, tuple(value.shape))
             for key, value in block.state_dict().items()}
    with torch.no_grad():
        for key, value in block.state_dict().items():
            value.copy_(torch.from_numpy(state[key]))
    moe = MoE(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, dtype="float64", seed=0,
              **{**OPTIONS, "normalize_top_k": normalize})
    tm.io.load_mixtral(moe, {key: value for key, value in state.items() if key.startswith(("gate.", "experts."))})
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        set_parameter(getattr(moe.shared, ours), state[f"shared_expert.{theirs}.weight"])
    set_parameter(moe.shared_gate, state["shared_expert_gate.weight"])
    x = np.random.default_rng(5).standard_normal((2, 12, D_MODEL))
    with torch.no_grad():
        expected = block(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(host(moe(tm.tensor(x, dtype="float64"))), expected, rtol=1e-6, atol=1e-6)
