"""MoEConfig: one frozen, keyword-only, validated home for the MoE options (each field documented), and the
ways to build an MoE layer from it: MoE(config), MoE(**options), MoE(d_model, d_ff, n_experts, ...), with
generator= (or seed=); Router and Experts take the config; statistics computed when read."""
import dataclasses
import math

import numpy as np
import pytest

import tinymoe as tm
from moe_helpers import inputs, set_parameter
from tinymoe.nn import Experts, MoE, MoEConfig, Router
from tinymoe.nn import moe_stats as moe_module  # where MoEStats reads its host values

SIZES = dict(d_model=6, d_ff=5, n_experts=4)


def test_the_fields_their_defaults_and_their_documentation():
    names = [field.name for field in dataclasses.fields(MoEConfig)]
    assert names == ["d_model", "d_ff", "n_experts", "top_k", "activation", "router", "normalize_top_k",
                     "capacity_factor", "n_shared_experts", "jitter", "bias_update_rate",
                     "n_groups", "topk_groups", "routed_scaling_factor", "shared_d_ff", "shared_expert_gate",
                     "router_bias", "expert_bias", "swiglu_alpha", "swiglu_limit", "capacity_per",
                     "top_p", "n_null_experts", "target_sparsity", "l1_coefficient", "l1_update_factor", "balance",
                     "dtype"]
    config = MoEConfig(**SIZES)
    assert (config.top_k, config.activation, config.router, config.normalize_top_k, config.capacity_factor,
            config.n_shared_experts, config.jitter, config.bias_update_rate, config.dtype) == \
        (2, "swiglu", "softmax", True, None, 0, 0.0, None, "float32")
    for field in dataclasses.fields(MoEConfig):
        assert field.metadata["help"].strip(), field.name
        assert callable(field.metadata["check"]), field.name
        if field.metadata["flag"]:
            assert field.metadata["paper"], field.name


def test_it_is_frozen_and_keyword_only():
    config = MoEConfig(**SIZES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 1
    with pytest.raises(TypeError):
        MoEConfig(6, 5, 4)
    assert dataclasses.replace(config, top_k=1).top_k == 1
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(config, top_k=5)  # replace validates too


@pytest.mark.parametrize("options, error, name", [
    (dict(normalize_top_k="no"), TypeError, "normalize_top_k"),
    (dict(normalize_top_k=1), TypeError, "normalize_top_k"),
    (dict(normalize_top_k=np.bool_(True)), TypeError, "normalize_top_k"),
    (dict(jitter=float("nan")), ValueError, "jitter"),
    (dict(jitter="0.1"), TypeError, "jitter"),
    (dict(capacity_factor=float("inf")), ValueError, "capacity_factor"),
    (dict(capacity_factor=True), TypeError, "capacity_factor"),
    (dict(bias_update_rate=float("nan"), router="sigmoid"), ValueError, "bias_update_rate"),
    (dict(d_model=0), ValueError, "d_model"),
    (dict(d_ff=2.0), TypeError, "d_ff"),
    (dict(n_experts=True), TypeError, "n_experts"),
    (dict(router="noisy", top_k=4), ValueError, "noisy"),
    (dict(dtype="int8"), TypeError, "dtype"),
])
def test_bad_options_raise_early_naming_the_option_and_its_value(options, error, name):
    with pytest.raises(error, match=name) as info:
        MoEConfig(**{**SIZES, **options})
    assert f"{name}=" in str(info.value) or name == "noisy"  # names the option with its value


def test_numbers_are_stored_as_python_numbers():
    config = MoEConfig(**SIZES, capacity_factor=np.float32(0.5), jitter=np.float64(0.25), top_k=np.int64(1))
    assert type(config.capacity_factor) is float and config.capacity_factor == 0.5
    assert type(config.jitter) is float and type(config.top_k) is int
    assert MoEConfig(**SIZES, dtype=np.float64).dtype == "float64"
    assert MoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_expertz"):
        MoEConfig.from_dict({**config.to_dict(), "n_expertz": 3})


def _weights(moe):
    return {name: parameter.numpy().copy() for name, parameter in moe.named_parameters()}


def test_every_way_to_build_a_layer_gives_the_same_layer():
    options = dict(SIZES, top_k=1, router="noisy", capacity_factor=1.5, n_shared_experts=1, dtype="float64")
    layers = [MoE(MoEConfig(**options), generator=3), MoE(**options, generator=3), MoE(**options, seed=3),
              MoE(6, 5, 4, **{k: v for k, v in options.items() if k not in SIZES}, seed=3),
              MoE(**options, generator=np.random.default_rng(3)), MoE(**options, seed=np.random.default_rng(3))]
    reference = _weights(layers[0])
    assert layers[0].config == MoEConfig(**options)
    for moe in layers[1:]:
        assert moe.config == layers[0].config
        assert _weights(moe).keys() == reference.keys()
        for name, values in _weights(moe).items():
            np.testing.assert_array_equal(values, reference[name])


@pytest.mark.parametrize("build, fragment", [
    (lambda: MoE(MoEConfig(**SIZES), top_k=1), "not both"),
    (lambda: MoE(6, 5, 4, 2), "positionally"),
    (lambda: MoE(6, 5, n_experts=4, d_ff=5), "d_ff twice"),
    (lambda: MoE(**SIZES, experts=4), "experts"),
    (lambda: MoE(**SIZES, generator=0, seed=0), "generator"),
    (lambda: MoE(**SIZES, generator="zero"), "generator"),
    (lambda: Router(dict(SIZES)), "MoEConfig"),
    (lambda: Experts(dict(SIZES)), "MoEConfig"),
])
def test_ambiguous_or_unknown_construction_arguments_are_type_errors(build, fragment):
    with pytest.raises(TypeError, match=fragment):
        build()


def test_router_and_experts_take_the_parts_of_the_config_they_need():
    config = MoEConfig(**SIZES, router="sigmoid", activation="gelu", bias_update_rate=0.1, dtype="float64")
    router, experts = Router(config, generator=0), Experts(config, generator=0)
    assert (router.kind, router.top_k, router.bias_update_rate, router.weight.shape) == ("sigmoid", 2, 0.1, (4, 6))
    assert experts.w1.shape == (4, 5, 6) and experts.b1.shape == (4, 5) and experts.w1.dtype == np.float64
    with pytest.raises(TypeError, match="float16"):
        Experts(MoEConfig(**SIZES, dtype="float16"), device="cpu")


def _softmax_probabilities(moe, x):
    logits = x.numpy() @ moe.router.weight.numpy().T
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_statistics_are_computed_when_read_not_in_forward(monkeypatch):
    moe = MoE(**SIZES, top_k=2, capacity_factor=0.5, dtype="float64", seed=0)
    set_parameter(moe.router.weight, 2.0 * np.random.default_rng(0).standard_normal((4, 6)))
    x = inputs((10, 6))
    transfers = []
    real = moe_module.to_numpy
    monkeypatch.setattr(moe_module, "to_numpy", lambda array: transfers.append(array) or real(array))
    with tm.kernels.use("numpy"):
        moe(x)
    assert transfers == []  # forward itself moved nothing to the host for the statistics
    stats = moe.stats
    kept = stats.kept_per_expert
    assert transfers == [] and stats.tokens_per_expert is kept  # kept counts are host values of the plan
    capacity = math.ceil(0.5 * 10 * 2 / 4)
    assert kept.max() <= capacity and kept.sum() == 20 - round(20 * stats.dropped_fraction)
    probs = _softmax_probabilities(moe, x)
    entropy = float(np.mean(-(probs * np.log(probs)).sum(axis=1)))
    assert stats.router_entropy == pytest.approx(entropy, rel=1e-12)
    assert stats.mean_top1_probability == pytest.approx(float(probs.max(axis=1).mean()), rel=1e-12)
    assert len(transfers) == 1  # entropy and top-1 probability came over together
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(stats.requested_per_expert, np.bincount(ids.ravel(), minlength=4))
    assert set(stats.as_dict()) == {"tokens_per_expert", "kept_per_expert", "requested_per_expert",
                                    "dropped_fraction", "router_entropy", "mean_top1_probability"}
