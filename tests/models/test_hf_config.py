"""parse_hf_config and the weight maps against transformers itself: for each model_type a tiny config (the
config class's defaults, shrunk) parses; the spec agrees with what the transformers model built from it does
(MoE layers, sliding layers, softmax scale, rotary frequencies); the key/shape maps equal its state_dict and
the safetensors file its save_pretrained writes; unsupported values raise naming the field."""
import os

import numpy as np
import pytest

from tinymoe.functional.rotary import rotary_frequencies
from tinymoe.models.hf_config import SUPPORTED_MODEL_TYPES, parse_hf_config
from tinymoe.models.hf_weights import layer_weight_shapes, model_weight_shapes

SMALL = dict(vocab_size=11, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=24, max_position_embeddings=256)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
        "original_max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# id: (config class, model class, extra config fields)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=6, rope_parameters=LLAMA3)),
    "llama_tied_bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=6)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=3, num_experts_per_tok=2)),
    "mixtral_sliding": ("MixtralConfig", "MixtralForCausalLM",
                        dict(num_local_experts=3, num_experts_per_tok=1, sliding_window=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=8,
                       shared_expert_intermediate_size=12, mlp_only_layers=[0], norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=6,
                       decoder_sparse_step=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=3, num_experts_per_tok=2, eos_token_id=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_group=2, topk_group=1,
                         first_k_dense_replace=1, q_lora_rank=10, kv_lora_rank=6, qk_nope_head_dim=4,
                         qk_rope_head_dim=2, v_head_dim=5, n_shared_experts=2, rope_parameters=YARN)),
    "deepseek_v3_no_q_lora": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                              dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_group=1,
                                   topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=6,
                                   qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, attention_bias=True,
                                   rope_interleave=False)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=3, num_experts_per_tok=2, head_dim=6)),
}


def tiny_transformers_model(case):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config_class, model_class, extra = CASES[case]
    config = getattr(transformers, config_class)(**SMALL, **extra)
    return config, getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_spec_agrees_with_the_transformers_model(case):
    config, model = tiny_transformers_model(case)
    spec = parse_hf_config(config.to_dict())
    assert spec.model_type == config.model_type and spec.num_layers == 3
    layers = model.model.layers
    is_moe = tuple(hasattr(layer.mlp, "experts") for layer in layers)
    assert spec.moe_layers == is_moe and any(is_moe) == (spec.n_experts > 0)
    if config.model_type == "gpt_oss":
        windows = tuple(layer.self_attn.sliding_window for layer in layers)  # set per layer by the module
    else:  # Mixtral's attention passes config.sliding_window to every layer; the others use none
        windows = (config.sliding_window if config.model_type == "mixtral" else None,) * 3
    assert tuple(spec.sliding_window if kind == "sliding_attention" else None for kind in spec.layer_types) == windows
    assert spec.attention_scale == pytest.approx(layers[0].self_attn.scaling, rel=1e-12)
    rope = model.model.rotary_emb
    inv_freq, attention_factor = rotary_frequencies(spec.rotary_dim, spec.rope_theta, spec.rope_scaling,
                                                    spec.max_position_embeddings)
    np.testing.assert_allclose(inv_freq, rope.inv_freq.double().numpy(), rtol=2e-6)
    assert attention_factor == pytest.approx(rope.attention_scaling, rel=1e-12)
    assert spec.attention_sinks == hasattr(layers[0].self_attn, "sinks")


@pytest.mark.parametrize("case", list(CASES))
def test_weight_maps_equal_the_state_dict_and_the_saved_checkpoint(case, tmp_path):
    config, model = tiny_transformers_model(case)
    from safetensors import safe_open

    spec = parse_hf_config(config.to_dict())
    in_memory = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert model_weight_shapes(spec, layout="transformers") == in_memory
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "np") as saved:
        on_disk = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}
    assert model_weight_shapes(spec) == on_disk
    assert set(layer_weight_shapes(spec, 2)) == {key for key in on_disk if key.startswith("model.layers.2.")}


# Names transformers 5.24 writes, recorded from tiny models (the oracle above checks them all; these few are
# kept literally so a change of layout reads as a diff here).
RECORDED = {
    "mixtral": {"model.layers.0.block_sparse_moe.gate.weight": (3, 16),
                "model.layers.0.block_sparse_moe.experts.2.w1.weight": (24, 16),
                "model.layers.0.block_sparse_moe.experts.2.w2.weight": (16, 24)},
    "qwen2_moe": {"model.layers.1.mlp.shared_expert_gate.weight": (1, 16),
                  "model.layers.1.mlp.experts.0.up_proj.weight": (8, 16), "model.layers.0.mlp.gate_proj.weight": (24, 16)},
    "deepseek_v3": {"model.layers.1.self_attn.kv_b_proj.weight": (36, 6),
                    "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": (8, 16),
                    "model.layers.1.mlp.gate.e_score_correction_bias": (4,),
                    "model.layers.1.mlp.shared_experts.down_proj.weight": (16, 16)},
    "gpt_oss": {"model.layers.0.mlp.experts.gate_up_proj": (3, 16, 48), "model.layers.0.mlp.experts.down_proj": (3, 24, 16),
                "model.layers.0.self_attn.sinks": (4,), "model.layers.0.mlp.router.bias": (3,)},
    "olmoe": {"model.layers.0.self_attn.q_norm.weight": (16,), "model.layers.0.self_attn.k_norm.weight": (8,)},
}


@pytest.mark.parametrize("case", list(RECORDED))
def test_recorded_checkpoint_names(case):
    transformers = pytest.importorskip("transformers")
    config_class, _, extra = CASES[case]
    shapes = model_weight_shapes(parse_hf_config(getattr(transformers, config_class)(**SMALL, **extra).to_dict()))
    assert {key: shapes.get(key) for key in RECORDED[case]} == RECORDED[case]


def test_legacy_hub_config_format_parses():
    """Hub config.json files written by transformers 4: rope_theta at the top, rope_scaling with "type"."""
    config = {"model_type": "deepseek_v3", **SMALL, "n_routed_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 8, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
              "q_lora_rank": 10, "kv_lora_rank": 6, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 5,
              "n_shared_experts": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000, "scoring_func": "sigmoid",
              "topk_method": "noaux_tc", "moe_layer_freq": 1, "eos_token_id": [1, 2],
              "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096}}
    spec = parse_hf_config(config)
    assert spec.rope_theta == 10000.0 and spec.rope_scaling["type"] == "yarn" and spec.rotary_dim == 2
    assert spec.attention_scale == pytest.approx(6 ** -0.5 * (0.1 * np.log(40) + 1) ** 2)
    assert spec.rope_layout == "interleaved" and spec.eos_token_id == (1, 2) and spec.moe_layers == (False, True, True)
    assert spec.value_head_dim == 5 and spec.head_dim == 6 and spec.shared_intermediate_size == 8


def _base(model_type, **changes):
    config = {"model_type": model_type, **SMALL, "rms_norm_eps": 1e-6, "num_local_experts": 4, "num_experts": 4,
              "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "kv_lora_rank": 6,
              "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 4, "sliding_window": 8}
    config.update(changes)
    return config


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_every_type_parses_a_hand_written_config(model_type):
    spec = parse_hf_config(_base(model_type))
    assert spec.hidden_size == 16 and spec.num_kv_heads == 2


@pytest.mark.parametrize("config, match", [
    (_base("mistral"), "model_type='mistral' is not implemented"),
    (_base("llama", hidden_act="gelu"), "hidden_act='gelu' is not implemented"),
    (_base("qwen3_moe", attention_dropout=0.1), "attention_dropout=0.1"),
    (_base("gpt_oss", quantization_config={"quant_method": "mxfp4"}), "quant_method='mxfp4'"),
    (_base("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type='dynamic'"),
    (_base("llama", rope_scaling={"type": "linear"}), r"needs scaling keys \['factor'\]"),
    (_base("deepseek_v3", scoring_func="softmax"), "scoring_func='softmax'"),
    (_base("deepseek_v3", topk_method="greedy"), "topk_method='greedy'"),
    (_base("deepseek_v3", n_group=3), "n_group=3 must divide"),
    (_base("llama", mlp_bias=True), "mlp_bias=True"),
    (_base("qwen2", use_sliding_window=True), "use_sliding_window=True"),
    (_base("mixtral", router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    (_base("olmoe", clip_qkv=8.0), "clip_qkv=8.0"),
    (_base("llama", num_key_value_heads=3), "multiple of num_key_value_heads=3"),
    (_base("mixtral", num_experts_per_tok=5), "num_experts_per_tok=5 exceeds"),
    (_base("llama", vocab_size=0), "vocab_size=0 must be an int >= 1"),
    (_base("gpt_oss", layer_types=["full_attention"]), "layer_types="),
    ({k: v for k, v in _base("llama").items() if k != "rms_norm_eps"}, "lacks the field 'rms_norm_eps'"),
])
def test_unsupported_values_raise_naming_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        parse_hf_config(config)


def test_weight_map_errors():
    spec = parse_hf_config(_base("llama"))
    with pytest.raises(ValueError, match=r"layer=3 must be an int in \[0, 3\)"):
        layer_weight_shapes(spec, 3)
    with pytest.raises(ValueError, match="layout='fused'"):
        layer_weight_shapes(spec, 0, layout="fused")
