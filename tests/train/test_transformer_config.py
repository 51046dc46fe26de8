"""TransformerConfig: validation by name, every MoE option reaching the layers, the nested `moe` (a MoEConfig),
to_dict/from_dict round trips, and the flat dicts of earlier releases (old checkpoints) still loading."""
import dataclasses
import json
import math

import numpy as np
import pytest

from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.nn import MoEConfig
from transformer_helpers import numpy_kernels, random_tokens, tiny_config  # noqa: F401  (autouse fixture)


# ----- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, name", [
    (dict(d_model=10, n_heads=4), "n_heads"),
    (dict(moe_layers=[2]), "moe_layers"),
    (dict(moe_layers=[-1]), "moe_layers"),
    (dict(aux_coef=-0.1), "aux_coef"),
    (dict(z_coef=-1.0), "z_coef"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_experts=0), "n_experts"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_rejects_bad_values_by_name(overrides, name):
    with pytest.raises((ValueError, TypeError), match=name):
        tiny_config(**overrides)


def test_config_round_trips_through_a_dict():
    config = tiny_config(router="sigmoid", bias_update_rate=0.01, moe_layers=[1], capacity_factor=1.5)
    assert TransformerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_expertz"):
        TransformerConfig.from_dict({**config.to_dict(), "n_expertz": 3})


def _train_forward(model, seed=0):
    tokens = random_tokens((4, 8), seed=seed)
    total, parts = model.loss(tokens, random_tokens((4, 8), seed=seed + 1))
    return total, parts


def test_capacity_factor_reaches_the_layers():
    dropless = MoETransformer(tiny_config(), seed=0)
    _train_forward(dropless)
    assert all(layer.stats.dropped_fraction == 0.0 for layer in dropless.moe_layers())
    tight = MoETransformer(tiny_config(capacity_factor=0.25), seed=0)
    _train_forward(tight)
    for layer in tight.moe_layers():
        capacity = math.ceil(0.25 * 32 * 2 / 4)
        assert layer.stats.dropped_fraction > 0
        assert layer.stats.tokens_per_expert.max() <= capacity


def test_top_k_and_n_experts_reach_the_layers():
    model = MoETransformer(tiny_config(n_experts=5, top_k=1), seed=0)
    _train_forward(model)
    for layer in model.moe_layers():
        assert layer.stats.tokens_per_expert.shape == (5,)
        assert layer.stats.tokens_per_expert.sum() == 32  # one expert per token


def test_shared_experts_add_an_always_on_block():
    plain = MoETransformer(tiny_config(), seed=0)
    shared = MoETransformer(tiny_config(n_shared_experts=2), seed=0)
    assert shared.num_parameters() - plain.num_parameters() == 2 * 3 * 8 * (2 * 6)  # w1, w3, w2 of width 2·d_ff
    assert math.isfinite(_train_forward(shared)[0].item())


def test_activation_reaches_the_experts():
    swiglu = MoETransformer(tiny_config(), seed=0)
    gelu = MoETransformer(tiny_config(activation="gelu"), seed=0)
    names = {name for name, _ in gelu.named_parameters()}
    assert "blocks.0.ffn.experts.b1" in names and "blocks.0.ffn.experts.w3" not in names
    assert "blocks.0.ffn.experts.w3" in {name for name, _ in swiglu.named_parameters()}


def test_normalize_top_k_reaches_the_router():
    tokens = random_tokens((2, 8), seed=3)
    normalized = MoETransformer(tiny_config(), seed=0).eval()
    raw = MoETransformer(tiny_config(normalize_top_k=False), seed=0).eval()
    assert np.abs(normalized(tokens).numpy() - raw(tokens).numpy()).max() > 1e-8


def test_sigmoid_router_with_bias_updates_in_training():
    model = MoETransformer(tiny_config(router="sigmoid", bias_update_rate=0.05), seed=0)
    biases = [name for name in model.state_dict() if name.endswith("router.bias")]
    assert len(biases) == 2
    before = {name: model.state_dict()[name].copy() for name in biases}
    _train_forward(model)
    after = model.state_dict()
    assert any(np.abs(after[name] - before[name]).max() > 0 for name in biases)


def test_jitter_and_dropout_are_random_in_training_only():
    tokens = random_tokens((2, 8), seed=4)
    for overrides in (dict(jitter=0.3), dict(dropout=0.3)):
        model = MoETransformer(tiny_config(**overrides), seed=0)
        first, second = model(tokens).numpy(), model(tokens).numpy()
        assert np.abs(first - second).max() > 1e-9, overrides
        model.eval()
        np.testing.assert_array_equal(model(tokens).numpy(), model(tokens).numpy())


def test_expert_choice_router_runs():
    model = MoETransformer(tiny_config(router="expert_choice"), seed=0)
    total, _ = _train_forward(model)
    total.backward()
    assert math.isfinite(total.item())
    assert model.moe_layers()[0].router.weight.grad is not None


def test_seed_fixes_the_initialisation():
    first, second = MoETransformer(tiny_config(), seed=7), MoETransformer(tiny_config(), seed=7)
    other = MoETransformer(tiny_config(), seed=8)
    for (name, a), (_, b), (_, c) in zip(first.state_dict().items(), second.state_dict().items(),
                                         other.state_dict().items()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values())
               if a.std() > 0)


# ----- the nested MoE config and the flat dicts of earlier releases ---------------------------------------------
# model_config of a checkpoint written by tinymoe 0.1.0 (`tinymoe train` defaults), copied from its meta
RELEASE_0_1_CONFIG = {
    "vocab_size": 41, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "d_ff": 128, "n_experts": 4,
    "top_k": 2, "moe_layers": ["all"], "router": "softmax", "normalize_top_k": True, "capacity_factor": None,
    "n_shared_experts": 0, "jitter": 0.0, "bias_update_rate": None, "activation": "swiglu", "aux_coef": 0.01,
    "z_coef": 0.001, "noisy_coef": 0.01, "dropout": 0.0, "dtype": "float32"}


def test_the_moe_options_live_in_a_nested_moe_config():
    moe = MoEConfig(d_model=8, d_ff=6, n_experts=3, top_k=1, router="sigmoid", dtype="float64")
    config = TransformerConfig(vocab_size=5, d_model=8, n_heads=2, moe=moe, dtype="float64")
    assert config.moe is moe
    layer = MoETransformer(config, seed=0).moe_layers()[0]
    assert layer.config == moe and layer.n_experts == 3 and layer.router.kind == "sigmoid"
    as_dict = config.to_dict()
    assert as_dict["moe"] == dataclasses.asdict(moe)
    assert {key: as_dict["moe"][key] for key in ("d_model", "d_ff", "n_experts", "top_k", "router", "dtype")} == \
        {"d_model": 8, "d_ff": 6, "n_experts": 3, "top_k": 1, "router": "sigmoid", "dtype": "float64"}
    assert not {"d_ff", "n_experts", "top_k", "router"} & set(as_dict)
    assert TransformerConfig.from_dict(json.loads(json.dumps(as_dict))) == config


def test_a_config_without_moe_gets_the_defaults_of_earlier_releases():
    moe = TransformerConfig(vocab_size=5, d_model=16, dtype="float64").moe
    assert (moe.d_model, moe.d_ff, moe.n_experts, moe.top_k, moe.dtype) == (16, 128, 4, 2, "float64")


def test_a_flat_config_of_release_0_1_loads_as_the_nested_one():
    config = TransformerConfig.from_dict(RELEASE_0_1_CONFIG)
    expected = MoEConfig(d_model=64, d_ff=128, n_experts=4, top_k=2, dtype="float32")
    assert config.moe == expected
    assert (config.vocab_size, config.d_model, config.n_layers, config.aux_coef) == (41, 64, 2, 0.01)
    options = dict(RELEASE_0_1_CONFIG, router="noisy", capacity_factor=1.5, jitter=0.1, n_experts=6)
    noisy = TransformerConfig.from_dict(options).moe
    assert (noisy.router, noisy.capacity_factor, noisy.jitter, noisy.n_experts) == ("noisy", 1.5, 0.1, 6)


def test_a_dict_with_both_forms_or_a_stray_moe_key_is_refused():
    nested = TransformerConfig.from_dict(RELEASE_0_1_CONFIG).to_dict()
    with pytest.raises(ValueError, match="n_experts"):
        TransformerConfig.from_dict({**nested, "n_experts": 8})
    with pytest.raises(ValueError, match="n_expertz"):
        TransformerConfig.from_dict({**nested, "moe": {**nested["moe"], "n_expertz": 8}})


@pytest.mark.parametrize("field, value", [("d_model", 16), ("dtype", "float32")])
def test_an_moe_config_of_another_width_or_dtype_is_refused(field, value):
    options = dict(d_model=8, d_ff=6, n_experts=3, dtype="float64")
    with pytest.raises(ValueError, match=f"moe.{field}"):
        TransformerConfig(vocab_size=5, d_model=8, n_heads=2, dtype="float64",
                          moe=MoEConfig(**{**options, field: value}))


def test_bad_moe_options_are_named():
    with pytest.raises(TypeError, match="normalize_top_k"):
        tiny_config(normalize_top_k="no")
    with pytest.raises(ValueError, match="router"):
        tiny_config(router="top2")
    with pytest.raises(TypeError, match="moe"):
        TransformerConfig(vocab_size=5, moe=[("d_ff", 4)])
