"""estimate(config): parameter counts against built models, active parameters and FLOPs against hand formulas,
activation memory against what tracemalloc measures after a real forward."""
import tracemalloc

import numpy as np
import pytest

from tinymoe.models.transformer import FLAT_MOE_KEYS

from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.train.estimate import estimate

CONFIGS = [
    dict(moe=dict(d_ff=32, n_experts=4, top_k=2)),
    dict(moe=dict(d_ff=16, n_experts=8, top_k=1, router="noisy", activation="gelu", n_shared_experts=2)),
    dict(moe=dict(d_ff=24, n_experts=6, top_k=3, router="sigmoid", bias_update_rate=0.01), moe_layers=[1]),
    dict(moe=dict(d_ff=24, n_experts=4, router="expert_choice", capacity_factor=1.5, activation="relu"),
         moe_layers=[0, 2], dropout=0.1),
]


def _config(extra, dtype="float32"):
    return TransformerConfig(vocab_size=37, d_model=32, n_layers=3, n_heads=4, max_seq_len=24, dtype=dtype, **extra)


@pytest.mark.parametrize("extra", CONFIGS)
def test_total_parameters_equal_those_of_the_built_model(extra):
    config = _config(extra)
    model = MoETransformer(config)
    assert estimate(config).total_parameters == sum(p.size for p in model.parameters())


def test_flat_and_nested_dicts_read_like_the_config():
    config = _config(CONFIGS[0])
    nested = config.to_dict()
    flat = {**{k: v for k, v in nested.items() if k != "moe"},
            **{k: v for k, v in nested["moe"].items() if k in FLAT_MOE_KEYS}}
    assert estimate(nested) == estimate(config) == estimate(flat)


def test_active_parameters_and_flops_match_hand_formulas():
    # V=37, d=32, 3 layers, S=24, E=4, k=2, f=32 SwiGLU, all layers MoE
    config = _config(CONFIGS[0])
    V, d, n, S, E, k, f, L = 37, 32, 3, 24, 4, 2, 32, 16
    result = estimate(config, batch_size=2, seq_len=L)
    embeddings, attention, norms = V * d + S * d, 4 * d * d, 2 * d
    assert result.total_parameters == embeddings + n * (attention + norms + E * d + E * 3 * f * d) + d
    assert result.active_parameters == embeddings + n * (attention + norms + E * d + k * 3 * f * d) + d
    matmul = n * (4 * d * d + E * d + k * 3 * f * d) + V * d
    assert result.forward_flops_per_token == 2 * matmul + n * 4 * L * d
    assert result.training_flops_per_token == 3 * result.forward_flops_per_token


def test_expert_choice_counts_capacity_factor_experts_per_token():
    config = _config(dict(moe=dict(d_ff=8, n_experts=4, top_k=1, router="expert_choice", capacity_factor=3.0)))
    n, d, f, E = 3, 32, 8, 4
    result = estimate(config)
    assert result.total_parameters - result.active_parameters == n * (E - 3) * 3 * f * d


def test_memory_of_weights_gradients_and_adamw():
    config = _config(CONFIGS[0], dtype="float64")
    result = estimate(config)
    assert result.weights_bytes == 8 * result.total_parameters == result.gradients_bytes
    assert result.optimizer_bytes == 2 * result.weights_bytes
    split = estimate(config, expert_parallel=2)
    experts = 3 * 4 * 3 * 32 * 32  # layers · E · 3·f·d
    assert result.weights_bytes - split.weights_bytes == 8 * experts // 2
    assert split.activations_bytes == result.activations_bytes


def test_float16_model_keeps_its_router_in_float32():
    config = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_seq_len=4, dtype="float16",
                               moe=dict(d_ff=4, n_experts=2, top_k=1))
    result = estimate(config)
    assert result.weights_bytes == 2 * result.total_parameters + 2 * (2 * 8)  # router: 2 more bytes per weight


@pytest.mark.parametrize("extra", CONFIGS)
def test_activations_agree_with_the_memory_a_forward_keeps(extra):
    config = _config(extra, dtype="float64")
    model = MoETransformer(config).train()
    tokens = np.random.default_rng(0).integers(0, 37, (6, 24))
    model.loss(tokens, tokens)  # warm-up: caches and lazy imports are not activations
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        graph = model.loss(tokens, tokens)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del graph
    assert estimate(config, batch_size=6, seq_len=24).activations_bytes == pytest.approx(kept, rel=0.15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size"), (dict(seq_len=25), "max_seq_len"), (dict(expert_parallel=3), "divide"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate(_config(CONFIGS[0]), **kwargs)
    with pytest.raises(TypeError, match="TransformerConfig or a dict"):
        estimate("config")


OPTION_CONFIGS = [
    dict(moe=dict(d_ff=16, n_experts=4, top_k=2, n_null_experts=3)),
    dict(moe=dict(d_ff=16, n_experts=4, top_k=2, n_shared_experts=2, shared_d_ff=20, shared_expert_gate=True)),
    dict(moe=dict(d_ff=16, n_experts=4, top_k=2, router_bias=True, expert_bias=True)),
    dict(moe=dict(d_ff=16, n_experts=4, top_k=1, activation="swiglu_clamped", expert_bias=True, router="sigmoid",
                  router_bias=True, n_shared_experts=1, shared_expert_gate=True), moe_layers=[0, 2]),
    dict(moe=dict(d_ff=16, n_experts=4, top_k=2, router="top_p", top_p=0.5)),
]


@pytest.mark.parametrize("extra", OPTION_CONFIGS, ids=["null", "shared_d_ff+gate", "biases", "clamped+all", "top_p"])
def test_parameter_counts_of_the_architecture_options_equal_the_built_model(extra):
    config = _config(extra)
    model = MoETransformer(config)
    parameters = dict(model.named_parameters())
    result = estimate(config)
    assert result.total_parameters == sum(p.size for p in parameters.values())
    routers = sum(p.size for name, p in parameters.items() if ".router." in name)
    shared = sum(p.size for name, p in parameters.items() if ".shared" in name)
    assert result.parameters_by_part["routers"] == routers
    assert result.parameters_by_part["shared_experts"] == shared


def test_option_parameters_match_hand_formulas():
    # d=32, 3 MoE layers, E=4, m=3 null experts, f=16: router (E+m)·d; biases b1, b3 (E, f), b2 (E, d) and b (E,)
    d, n, E, f = 32, 3, 4, 16
    null = estimate(_config(OPTION_CONFIGS[0])).parameters_by_part
    assert null["routers"] == n * (E + 3) * d
    biased = estimate(_config(OPTION_CONFIGS[2])).parameters_by_part
    assert biased["routers"] == n * (E * d + E)
    assert biased["experts"] == n * E * (3 * f * d + 2 * f + d)
    shared = estimate(_config(OPTION_CONFIGS[1])).parameters_by_part
    assert shared["shared_experts"] == n * (3 * 20 * d + d)
