"""from_pretrained / save_pretrained without torch: checkpoints written by NumPy and tinymoe.io (single file,
sharded, bfloat16), every tensor landing in its parameter, and clear errors for missing, unexpected and
mis-shaped tensors, configs that contradict the weights; GPT-OSS's fused interleaved experts and DeepSeek-V3's
correction bias in both directions."""
import json
import os

import numpy as np
import pytest

from hf_model_helpers import CONFIGS, random_weights, reference_logits, write_checkpoint
from tinymoe.io import load_safetensors
from tinymoe.models.hf_checkpoint import CheckpointError, checkpoint_tensors
from tinymoe.models.hf_model import HFCausalLM
from tinymoe.models.hf_weights import model_weight_shapes
from tinymoe.models.pretrained import from_pretrained

IDS = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])


def _bf16_round(array):
    """float32 -> nearest bfloat16 (ties to even) -> float32, by bit arithmetic."""
    bits = np.asarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe", "llama_tied_bias"])
def test_every_tensor_lands_in_its_parameter(case, tmp_path):
    tensors = write_checkpoint(tmp_path, CONFIGS[case], seed=4)
    model = from_pretrained(tmp_path, dtype="float64")
    parameters = {name: parameter.numpy() for name, parameter in model.named_parameters()}
    mixtral = CONFIGS[case]["model_type"] == "mixtral"
    for layer in range(3):
        prefix = f"model.layers.{layer}."
        np.testing.assert_array_equal(parameters[prefix + "self_attn.q_proj.weight"],
                                      tensors[prefix + "self_attn.q_proj.weight"])
        if not model.model.layers[layer].is_moe:
            np.testing.assert_array_equal(parameters[prefix + "mlp.w3"], tensors[prefix + "mlp.up_proj.weight"])
            continue
        block = prefix + ("block_sparse_moe." if mixtral else "mlp.")
        np.testing.assert_array_equal(parameters[prefix + "mlp.router.weight"], tensors[block + "gate.weight"])
        for expert in range(model.spec.n_experts):
            for ours, theirs in (("w1", "w1" if mixtral else "gate_proj"), ("w3", "w3" if mixtral else "up_proj"),
                                 ("w2", "w2" if mixtral else "down_proj")):
                np.testing.assert_array_equal(parameters[f"{prefix}mlp.experts.{ours}"][expert],
                                              tensors[f"{block}experts.{expert}.{theirs}.weight"])
    assert ("lm_head.weight" in parameters) == (case != "llama_tied_bias")


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    tensors = write_checkpoint(tmp_path / "sharded", CONFIGS["olmoe"], seed=5, shard_bytes=4000)
    assert len([name for name in os.listdir(tmp_path / "sharded") if name.endswith(".safetensors")]) > 3
    logits = from_pretrained(tmp_path / "sharded", dtype="float64")(IDS).numpy()
    np.testing.assert_allclose(logits, reference_logits(CONFIGS["olmoe"], tensors, IDS), atol=1e-11)


def test_save_pretrained_in_shards_round_trips(tmp_path):
    model = HFCausalLM(CONFIGS["qwen3_moe"], dtype="float64", seed=3)
    model.save_pretrained(tmp_path, max_shard_bytes=3000)
    with open(tmp_path / "model.safetensors.index.json") as handle:
        weight_map = json.load(handle)["weight_map"]
    assert set(weight_map) == set(model_weight_shapes(model.spec)) and len(set(weight_map.values())) > 3
    assert not (tmp_path / "model.safetensors").exists()
    np.testing.assert_array_equal(from_pretrained(tmp_path, dtype="float64")(IDS).numpy(), model(IDS).numpy())


def test_bfloat16_checkpoint_is_widened_exactly(tmp_path):
    tensors = write_checkpoint(tmp_path, CONFIGS["qwen3_moe"], seed=6, bf16=True)
    model = from_pretrained(tmp_path, dtype="float32")
    parameters = dict(model.named_parameters())
    np.testing.assert_array_equal(parameters["model.layers.1.mlp.experts.w2"].numpy()[3],
                                  _bf16_round(tensors["model.layers.1.mlp.experts.3.down_proj.weight"]))
    np.testing.assert_array_equal(parameters["model.embed_tokens.weight"].numpy(),
                                  _bf16_round(tensors["model.embed_tokens.weight"]))


@pytest.mark.parametrize("case", list(CONFIGS))
def test_checkpoint_names_and_shapes_are_the_weight_map(case):
    model = HFCausalLM(CONFIGS[case], seed=0)
    saved = checkpoint_tensors(model)
    assert {key: value.shape for key, value in saved.items()} == model_weight_shapes(model.spec)


@pytest.mark.parametrize("bf16", [False, True])
def test_save_pretrained_writes_the_same_tensors_and_config(tmp_path, bf16):
    tensors = write_checkpoint(tmp_path / "in", CONFIGS["mixtral"], seed=7)
    model = from_pretrained(tmp_path / "in")
    model.save_pretrained(tmp_path / "out", bf16=bf16)
    written = load_safetensors(tmp_path / "out" / "model.safetensors")
    assert list(written) == list(model_weight_shapes(model.spec))
    for key, value in tensors.items():
        np.testing.assert_array_equal(written[key], _bf16_round(value) if bf16 else value)
    with open(tmp_path / "out" / "config.json") as handle:
        config = json.load(handle)
    assert config["dtype"] == ("bfloat16" if bf16 else "float32")
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert {key: config[key] for key in CONFIGS["mixtral"]} == CONFIGS["mixtral"]
    if not bf16:
        np.testing.assert_array_equal(from_pretrained(tmp_path / "out")(IDS).numpy(), model(IDS).numpy())


def _broken(tmp_path, case="qwen3_moe", change=None, config_change=None):
    config = {**CONFIGS[case], **(config_change or {})}
    tensors = random_weights(CONFIGS[case], seed=8)
    if change:
        change(tensors)
    write_checkpoint(tmp_path, config, tensors=tensors)
    return tmp_path


def test_missing_key_is_named(tmp_path):
    path = _broken(tmp_path, change=lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \['model.layers.2.self_attn.k_norm.weight'\]"):
        from_pretrained(path)


def test_unexpected_key_is_named_with_its_file(tmp_path):
    path = _broken(tmp_path, change=lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['model.layers.0.mlp.extra.weight \(in .*model"
                                              r"\.safetensors\)'\]"):
        from_pretrained(path)


def test_wrong_shape_is_named_with_file_and_expectation(tmp_path):
    path = _broken(tmp_path, change=lambda t: t.update({"model.layers.1.mlp.experts.2.up_proj.weight":
                                                        np.zeros((8, 15), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.experts.2.up_proj.weight in .*model.safetensors "
                                              r"has shape \(8, 15\) but config.json implies \(8, 16\)"):
        from_pretrained(path)


def test_integer_weights_and_several_bad_shapes_are_all_named(tmp_path):
    def change(tensors):
        tensors["model.norm.weight"] = np.ones(16, np.int32)
        tensors["model.layers.0.self_attn.o_proj.weight"] = np.zeros((16, 23), np.float32)
    with pytest.raises(CheckpointError, match=r"o_proj.weight in .* has shape \(16, 23\) .*; model.norm.weight in "
                                              r".* holds int32 values; expected floating-point"):
        from_pretrained(_broken(tmp_path, change=change))


@pytest.mark.parametrize("config_change, match", [
    ({"num_hidden_layers": 4}, r"missing key\(s\) \['model.layers.3.*num_layers=4"),
    ({"num_experts": 3}, r"unexpected key\(s\) \['model.layers.1.mlp.experts.3.*n_experts=3"),
    ({"intermediate_size": 20}, r"model.layers.0.mlp.gate_proj.weight in .* has shape \(24, 16\) but config.json "
                                r"implies \(20, 16\)"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true but lm_head.weight .* differs"),
])
def test_config_contradicting_the_weights_is_named(tmp_path, config_change, match):
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(_broken(tmp_path, config_change=config_change))


def test_tied_checkpoint_may_carry_an_equal_lm_head(tmp_path):
    tensors = random_weights(CONFIGS["llama_tied_bias"], seed=9)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    write_checkpoint(tmp_path, CONFIGS["llama_tied_bias"], tensors=tensors)
    model = from_pretrained(tmp_path, dtype="float64")
    np.testing.assert_allclose(model(IDS).numpy(), reference_logits(CONFIGS["llama_tied_bias"], tensors, IDS), atol=1e-11)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        from_pretrained(tmp_path)


def test_gpt_oss_fused_interleaved_experts_land_in_their_parameters(tmp_path):
    tensors = write_checkpoint(tmp_path, CONFIGS["gpt_oss"], seed=4)
    parameters = {name: p.numpy() for name, p in from_pretrained(tmp_path, dtype="float64").named_parameters()}
    block = "model.layers.1.mlp."
    gate_up, gate_up_bias = tensors[block + "experts.gate_up_proj"], tensors[block + "experts.gate_up_proj_bias"]
    for expert in range(3):
        for j in range(24):  # column 2j is the gate of hidden unit j, column 2j + 1 its up (GptOssExperts)
            np.testing.assert_array_equal(parameters[block + "experts.w1"][expert, j], gate_up[expert, :, 2 * j])
            np.testing.assert_array_equal(parameters[block + "experts.w3"][expert, j], gate_up[expert, :, 2 * j + 1])
            assert parameters[block + "experts.b1"][expert, j] == gate_up_bias[expert, 2 * j]
            assert parameters[block + "experts.b3"][expert, j] == gate_up_bias[expert, 2 * j + 1]
        np.testing.assert_array_equal(parameters[block + "experts.w2"][expert], tensors[block + "experts.down_proj"][expert].T)
    np.testing.assert_array_equal(parameters[block + "experts.b2"], tensors[block + "experts.down_proj_bias"])
    np.testing.assert_array_equal(parameters[block + "router.logit_bias"], tensors[block + "router.bias"])
    np.testing.assert_array_equal(parameters["model.layers.2.self_attn.sinks"], tensors["model.layers.2.self_attn.sinks"])


def test_deepseek_correction_bias_and_shared_experts_load(tmp_path):
    tensors = write_checkpoint(tmp_path, CONFIGS["deepseek_v3"], seed=4)
    model = from_pretrained(tmp_path, dtype="float64")
    assert not model.model.layers[0].is_moe and model.model.layers[1].is_moe  # first_k_dense_replace=1
    moe = model.model.layers[2].mlp
    np.testing.assert_array_equal(moe.router.bias, tensors["model.layers.2.mlp.gate.e_score_correction_bias"])
    np.testing.assert_array_equal(moe.shared.w2.numpy(), tensors["model.layers.2.mlp.shared_experts.down_proj.weight"])
    np.testing.assert_array_equal(model.model.layers[1].self_attn.kv_b_proj.weight.numpy(),
                                  tensors["model.layers.1.self_attn.kv_b_proj.weight"])


@pytest.mark.parametrize("case", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_save_pretrained_writes_back_the_tensors_it_loaded(case, tmp_path):
    tensors = write_checkpoint(tmp_path / "in", CONFIGS[case], seed=7)
    model = from_pretrained(tmp_path / "in", dtype="float32")
    model.save_pretrained(tmp_path / "out")
    written = load_safetensors(tmp_path / "out" / "model.safetensors")
    assert list(written) == list(model_weight_shapes(model.spec))
    for key, value in tensors.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_a_wrong_fused_expert_shape_is_named(tmp_path):
    path = _broken(tmp_path, "gpt_oss", change=lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj":
                                                                   np.zeros((3, 16, 47), np.float32)}))
    with pytest.raises(CheckpointError, match=r"gate_up_proj in .* has shape \(3, 16, 47\) but config.json implies "
                                              r"\(3, 16, 48\)"):
        from_pretrained(path)


def test_a_missing_correction_bias_is_named(tmp_path):
    path = _broken(tmp_path, "deepseek_v3", change=lambda t: t.pop("model.layers.1.mlp.gate.e_score_correction_bias"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['model.layers.1.mlp.gate.e_score_correction_bias'\]"):
        from_pretrained(path)


def test_unsupported_config_field_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["llama"], "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not implemented"):
        from_pretrained(tmp_path)
