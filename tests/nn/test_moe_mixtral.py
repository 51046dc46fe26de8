"""Mixtral interop: load_mixtral (per-expert names, transformers' fused form, a common prefix), clear errors for
missing, unexpected and mis-shaped keys, mixtral_state_dict round trips, .safetensors files (round trip, bfloat16,
corrupt files), and equality with transformers' MixtralSparseMoeBlock and its load-balancing loss."""
import re

import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.nn import MoE

D_MODEL, D_FF, N_EXPERTS, TOP_K = 6, 5, 4, 2
PREFIX = "model.layers.0.block_sparse_moe."


def mixtral_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"gate": rng.normal(0, 1.0, (N_EXPERTS, D_MODEL)), "w1": rng.normal(0, 0.5, (N_EXPERTS, D_FF, D_MODEL)),
            "w3": rng.normal(0, 0.5, (N_EXPERTS, D_FF, D_MODEL)), "w2": rng.normal(0, 0.5, (N_EXPERTS, D_MODEL, D_FF))}


def per_expert_state(weights, prefix=""):
    state = {prefix + "gate.weight": weights["gate"]}
    for e in range(N_EXPERTS):
        for name in ("w1", "w2", "w3"):
            state[f"{prefix}experts.{e}.{name}.weight"] = weights[name][e]
    return state


def fused_state(weights, prefix=""):
    return {prefix + "gate.weight": weights["gate"],
            prefix + "experts.gate_up_proj": np.concatenate([weights["w1"], weights["w3"]], axis=1),  # gate rows first
            prefix + "experts.down_proj": weights["w2"]}


def reference_output(weights, xs):
    params = {"router.weight": weights["gate"], "experts.w1": weights["w1"], "experts.w3": weights["w3"],
              "experts.w2": weights["w2"]}
    return ref.token_choice(params, xs, TOP_K)["y"]


def fresh_layer(device="cpu", dtype="float64", **options):
    return MoE(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, dtype=dtype, device=device, seed=42, **options)


def parameter_arrays(moe):
    return {name: host(parameter).copy() for name, parameter in moe.named_parameters()}


# ----- loading ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", PREFIX, "model.layers.7.mlp."], ids=["bare", "block_sparse_moe", "mlp"])
@pytest.mark.parametrize("form", [per_expert_state, fused_state], ids=["per-expert", "fused"])
def test_load_mixtral_maps_names_onto_the_layer(device, form, prefix):
    weights = mixtral_weights()
    moe = fresh_layer(device)
    tm.io.load_mixtral(moe, form(weights, prefix))
    np.testing.assert_array_equal(host(moe.router.weight), weights["gate"])
    for name in ("w1", "w3", "w2"):
        np.testing.assert_array_equal(host(getattr(moe.experts, name)), weights[name])
    x = inputs((9, D_MODEL), device=device)
    with fast_kernels(device):
        np.testing.assert_allclose(host(moe(x)), reference_output(weights, host(x)), rtol=1e-10, atol=1e-12)


def test_fused_and_per_expert_forms_give_identical_layers():
    weights = mixtral_weights(3)
    fused, per_expert = fresh_layer(), fresh_layer()
    tm.io.load_mixtral(fused, fused_state(weights, PREFIX))
    tm.io.load_mixtral(per_expert, per_expert_state(weights))
    x = inputs((7, D_MODEL))
    np.testing.assert_array_equal(host(fused(x)), host(per_expert(x)))


def test_load_mixtral_casts_to_the_layer_dtype_and_clears_gradients():
    moe = fresh_layer(dtype="float32")
    moe(inputs((3, D_MODEL), dtype="float32")).sum().backward()
    assert moe.router.weight.grad is not None
    weights = mixtral_weights()
    tm.io.load_mixtral(moe, per_expert_state({k: v.astype(np.float64) for k, v in weights.items()}))
    assert moe.router.weight.dtype == np.float32 and moe.experts.w1.dtype == np.float32
    assert moe.router.weight.grad is None
    np.testing.assert_array_equal(host(moe.experts.w2), weights["w2"].astype(np.float32))


def test_a_prefix_picks_one_layer_of_a_full_checkpoint():
    layers = {i: mixtral_weights(i) for i in range(3)}
    checkpoint = {}
    for i, weights in layers.items():
        checkpoint.update(fused_state(weights, f"model.layers.{i}.mlp."))
    checkpoint["lm_head.weight"] = np.zeros((3, D_MODEL))
    moe = fresh_layer()
    with pytest.raises(ValueError, match="prefix"):
        tm.io.load_mixtral(moe, checkpoint)  # several layers: ambiguous
    tm.io.load_mixtral(moe, checkpoint, prefix="model.layers.1.mlp.")
    np.testing.assert_array_equal(host(moe.experts.w3), layers[1]["w3"])


# ----- errors naming the keys -------------------------------------------------------------------------------------
def assert_unchanged(moe, before):
    for name, value in parameter_arrays(moe).items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"{name} was written before the error")


@pytest.mark.parametrize("form, key", [
    (per_expert_state, "experts.2.w3.weight"),
    (per_expert_state, "experts.0.w1.weight"),
    (per_expert_state, "gate.weight"),
    (fused_state, "experts.down_proj"),
    (fused_state, "experts.gate_up_proj"),
])
def test_missing_keys_raise_an_error_naming_them(form, key):
    moe = fresh_layer()
    before = parameter_arrays(moe)
    state = form(mixtral_weights(), PREFIX)
    del state[PREFIX + key]
    with pytest.raises(KeyError, match=re.escape(key)):
        tm.io.load_mixtral(moe, state)
    assert_unchanged(moe, before)


@pytest.mark.parametrize("form, key", [
    (per_expert_state, "experts.4.w1.weight"),   # an expert the layer does not have
    (per_expert_state, "experts.1.w4.weight"),
    (per_expert_state, "gate.bias"),
    (fused_state, "experts.gate_up_proj_bias"),
    (fused_state, "experts.0.w1.weight"),        # the two forms mixed
])
def test_unexpected_keys_raise_an_error_naming_them(form, key):
    moe = fresh_layer()
    before = parameter_arrays(moe)
    state = form(mixtral_weights(), PREFIX)
    state[PREFIX + key] = np.zeros(3)
    with pytest.raises(KeyError, match=re.escape(PREFIX + key)):
        tm.io.load_mixtral(moe, state)
    assert_unchanged(moe, before)


@pytest.mark.parametrize("form, key, shape", [
    (per_expert_state, "gate.weight", (N_EXPERTS, D_MODEL + 1)),
    (per_expert_state, "experts.3.w2.weight", (D_FF, D_MODEL)),   # transposed
    (per_expert_state, "experts.1.w1.weight", (D_FF + 1, D_MODEL)),
    (fused_state, "experts.gate_up_proj", (N_EXPERTS, D_FF, D_MODEL)),  # w1 only, no w3
    (fused_state, "experts.down_proj", (N_EXPERTS, D_FF, D_MODEL)),
])
def test_mis_shaped_keys_raise_an_error_naming_them_and_the_shapes(form, key, shape):
    moe = fresh_layer()
    before = parameter_arrays(moe)
    state = form(mixtral_weights())
    state[key] = np.zeros(shape)
    with pytest.raises(ValueError, match=f"(?s){re.escape(key)}.*{re.escape(str(shape))}"):
        tm.io.load_mixtral(moe, state)
    assert_unchanged(moe, before)


@pytest.mark.parametrize("options", [dict(activation="gelu"), dict(router="expert_choice", capacity_factor=1.0)])
def test_layers_that_are_not_mixtral_shaped_refuse_mixtral_weights(options):
    moe = fresh_layer(**options)
    with pytest.raises(ValueError, match="Mixtral"):
        tm.io.load_mixtral(moe, per_expert_state(mixtral_weights()))
    with pytest.raises(ValueError, match="Mixtral"):
        tm.io.mixtral_state_dict(moe)


# ----- export and files ---------------------------------------------------------------------------------------------
def expected_names():
    return {"gate.weight"} | {f"experts.{e}.{n}.weight" for e in range(N_EXPERTS) for n in ("w1", "w2", "w3")}


def test_mixtral_state_dict_round_trips():
    source = layer(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, seed=5)
    state = tm.io.mixtral_state_dict(source)
    assert set(state) == expected_names()
    assert all(isinstance(value, np.ndarray) for value in state.values())
    assert state["experts.2.w2.weight"].shape == (D_MODEL, D_FF) and state["gate.weight"].shape == (N_EXPERTS, D_MODEL)
    target = fresh_layer()
    tm.io.load_mixtral(target, state)
    x = inputs((8, D_MODEL))
    np.testing.assert_array_equal(host(target(x)), host(source(x)))
    state["gate.weight"][:] = 0.0  # an export is a copy
    assert host(source.router.weight).any()


def test_safetensors_round_trip_into_a_layer(tmp_path):
    pytest.importorskip("safetensors")
    source = layer(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, seed=6)
    path = tmp_path / "layer0.safetensors"
    tm.io.save_safetensors({PREFIX + k: v for k, v in tm.io.mixtral_state_dict(source).items()}, path)
    loaded = tm.io.load_safetensors(path)
    assert set(loaded) == {PREFIX + name for name in expected_names()}
    for name, value in tm.io.mixtral_state_dict(source).items():
        assert loaded[PREFIX + name].dtype == np.float64
        np.testing.assert_array_equal(loaded[PREFIX + name], value)
    target = fresh_layer()
    tm.io.load_mixtral(target, loaded)
    x = inputs((8, D_MODEL))
    np.testing.assert_array_equal(host(target(x)), host(source(x)))
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temporary file behind


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge-header", "empty"])
def test_a_corrupt_safetensors_file_raises_a_clear_error(tmp_path, damage):
    pytest.importorskip("safetensors")
    path = tmp_path / f"{damage}.safetensors"
    tm.io.save_safetensors({"gate.weight": np.arange(12.0).reshape(3, 4)}, path)
    payload = path.read_bytes()
    path.write_bytes({
        "truncated": payload[: len(payload) - 20],
        "garbage": b"\x13\x37" * 40,
        "huge-header": (10**12).to_bytes(8, "little") + payload[8:],
        "empty": b"",
    }[damage])
    with pytest.raises(ValueError, match=re.escape(path.name)):
        tm.io.load_safetensors(path)


def test_a_missing_safetensors_file_raises_file_not_found(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        tm.io.load_safetensors(tmp_path / "nothing.safetensors")


def test_bfloat16_tensors_are_widened_to_float32_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    generator = torch.Generator().manual_seed(0)
    tensors = {"gate.weight": torch.randn(4, 6, generator=generator).to(torch.bfloat16),
               "experts.down_proj": torch.randn(2, 3, 5, generator=generator).to(torch.bfloat16),
               "scale": torch.randn(7, generator=generator)}
    path = tmp_path / "bf16.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    loaded = tm.io.load_safetensors(path)
    for name, value in tensors.items():
        assert loaded[name].dtype == np.float32 and loaded[name].shape == tuple(value.shape)
        np.testing.assert_array_equal(loaded[name], value.float().numpy())


# ----- transformers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_module():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return pytest.importorskip("transformers.models.mixtral.modeling_mixtral")


def transformers_block(mixtral_module, torch_dtype, seed=0):
    import torch
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=D_MODEL, intermediate_size=D_FF, num_local_experts=N_EXPERTS,
                           num_experts_per_tok=TOP_K, hidden_act="silu", router_jitter_noise=0.0)
    block = mixtral_module.MixtralSparseMoeBlock(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.7)
    return block.to(torch_dtype).eval()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_equals_transformers_mixtral_sparse_moe_block(mixtral_module, dtype):
    """transformers takes its router softmax in float32, so even in float64 the weights carry float32 rounding."""
    import torch

    block = transformers_block(mixtral_module, getattr(torch, dtype))
    moe = fresh_layer(dtype=dtype)
    tm.io.load_mixtral(moe, {name: value.detach().numpy() for name, value in block.state_dict().items()})
    x = np.random.default_rng(1).standard_normal((2, 5, D_MODEL))
    with torch.no_grad():
        expected = block(torch.tensor(x, dtype=getattr(torch, dtype))).numpy()
    actual = host(moe(tm.tensor(x, dtype=dtype)))
    assert actual.shape == expected.shape == (2, 5, D_MODEL)
    np.testing.assert_allclose(actual, expected, rtol=1e-6 if dtype == "float64" else 2e-5, atol=1e-6)


def test_transformers_load_balancing_loss_is_top_k_times_ours(mixtral_module):
    import torch

    if not hasattr(mixtral_module, "load_balancing_loss_func"):
        pytest.skip("this transformers has no load_balancing_loss_func")
    for top_k in (1, 2, 3):
        moe = layer(D_MODEL, D_FF, N_EXPERTS, top_k=top_k, seed=top_k)
        x = inputs((12, D_MODEL), seed=top_k)
        moe(x)
        logits = host(x) @ host(moe.router.weight).T
        theirs = mixtral_module.load_balancing_loss_func((torch.tensor(logits),), N_EXPERTS, top_k)
        assert float(host(moe.aux_loss)) != pytest.approx(1.0, abs=1e-3)  # not a balanced (trivial) case
        assert float(theirs) == pytest.approx(top_k * float(host(moe.aux_loss)), rel=1e-6)
