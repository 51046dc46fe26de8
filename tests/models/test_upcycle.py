"""tinymoe.models.upcycle (sparse upcycling, Komatsuzaki et al. 2022) of a dense MoETransformer and of dense
transformers checkpoints (llama -> mixtral, qwen3 -> qwen3_moe): logits at step 0 equal the dense model's
(float64), configs describe the upcycled model so checkpoints reload, and what cannot be stored is refused.
Oracles: the dense model's own logits before upcycling, hf_model_helpers' plain-loop decoder on the saved
checkpoint, and transformers' MixtralForCausalLM / Qwen3MoeForCausalLM where torch is installed."""
import json

import numpy as np
import pytest

from hf_model_helpers import CONFIGS, reference_logits, write_checkpoint
from tinymoe.io import load_safetensors
from tinymoe.models import MoETransformer, TransformerConfig, from_pretrained
from tinymoe.models.upcycle import upcycle
from tinymoe.nn import MoE, SwiGLU

VOCAB, LENGTH = 11, 8
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH))
HF_IDS = np.random.default_rng(1).integers(0, 13, (2, 7))


def dense_transformer(moe_layers=(), **moe):
    config = TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=3, n_heads=2, max_seq_len=LENGTH,
                               moe={"d_ff": 12, "n_experts": 4, "top_k": 2, **moe}, moe_layers=list(moe_layers),
                               dtype="float64")
    return MoETransformer(config, seed=0)


def assert_logits_equal(actual, expected):
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_upcycled_transformer_starts_from_the_dense_logits_and_its_config_reloads():
    model = dense_transformer()
    attention = model.blocks[0].attention
    before = model(TOKENS).numpy()
    assert upcycle(model, 4, 2, generator=1) is model  # in place
    assert all(isinstance(block.ffn, MoE) for block in model.blocks) and model.blocks[0].attention is attention
    assert model.config.moe_layers == ["all"] and (model.config.moe.d_ff, model.config.moe.top_k) == (24, 2)
    after = model(TOKENS).numpy()
    assert_logits_equal(after, before)
    reloaded = MoETransformer(TransformerConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))), seed=5)
    reloaded.load_state_dict(model.state_dict())
    assert np.array_equal(reloaded(TOKENS).numpy(), after)


def test_upcycling_some_layers_with_top_1_keeps_the_others_dense():
    model = dense_transformer()
    before = model(TOKENS).numpy()
    upcycle(model, 3, 1, layers=[2, 0], noise=0.0, generator=2, router="sigmoid")
    assert model.config.moe_layers == [0, 2] and [block.is_moe for block in model.blocks] == [True, False, True]
    assert (model.config.moe.d_ff, model.config.moe.router) == (24, "sigmoid")
    assert isinstance(model.blocks[1].ffn, SwiGLU)
    assert_logits_equal(model(TOKENS).numpy(), before)
    reloaded = MoETransformer(TransformerConfig.from_dict(model.config.to_dict()), seed=5)
    reloaded.load_state_dict(model.state_dict())
    assert np.array_equal(reloaded(TOKENS).numpy(), model(TOKENS).numpy())
    loss, parts = model.loss(TOKENS[:, :-1], TOKENS[:, 1:])
    assert np.isfinite(parts["aux"]) and parts["total"] > parts["cross_entropy"]


def test_upcycling_next_to_existing_moe_layers_needs_their_config():
    model = dense_transformer(moe_layers=[1], d_ff=24, top_k=1)  # dense width 24·1
    before = model(TOKENS).numpy()
    with pytest.raises(ValueError, match="holds one MoEConfig for all its MoE layers"):
        upcycle(model, 4, 1, router="sigmoid")
    assert not model.blocks[0].is_moe  # nothing changed by the failed call
    upcycle(model, 4, 1, generator=1)
    assert model.config.moe_layers == ["all"]
    assert_logits_equal(model(TOKENS).numpy(), before)


def test_transformer_refusals():
    model = dense_transformer()
    with pytest.raises(ValueError, match=r"layers \[1\] stay dense.*use top_k=1"):
        upcycle(model, 4, 2, layers=[0, 2])
    with pytest.raises(ValueError, match="would not compute the dense block"):
        upcycle(model, 4, 2, capacity_factor=1.25)
    with pytest.raises(ValueError, match="distinct indices in 0..2"):
        upcycle(model, 4, 1, layers=[3])
    with pytest.raises(TypeError, match="non-empty list of ints"):
        upcycle(model, 4, 1, layers=[])
    with pytest.raises(ValueError, match="'all' or a list"):
        upcycle(model, 4, 1, layers="some")
    assert model.config.moe_layers == [] and not any(block.is_moe for block in model.blocks)
    upcycle(model, 4, 1, layers=[1])
    with pytest.raises(ValueError, match=r"layers \[1\] are MoE layers already"):
        upcycle(model, 4, 1, layers=[1])
    with pytest.raises(TypeError, match="MoETransformer or HFCausalLM"):
        upcycle(SwiGLU(4, 4), 4, 1)


HF_CASES = [("qwen3", [0, 2], "qwen3_moe"), ("llama", "all", "mixtral")]


@pytest.mark.parametrize("case, layers, sibling", HF_CASES)
def test_upcycled_checkpoint_starts_from_the_dense_logits(case, layers, sibling, tmp_path):
    write_checkpoint(tmp_path, CONFIGS[case])
    model = from_pretrained(tmp_path, dtype="float64")
    before = model(HF_IDS).numpy()
    assert upcycle(model, 4, 2, layers=layers, generator=0) is model
    assert model.spec.model_type == model.config["model_type"] == sibling
    expected_moe = (True, False, True) if layers != "all" else (True,) * 3
    assert model.spec.moe_layers == expected_moe and [layer.is_moe for layer in model.model.layers] == list(expected_moe)
    assert_logits_equal(model(HF_IDS).numpy(), before)


@pytest.mark.parametrize("case, layers, sibling", HF_CASES)
def test_upcycled_checkpoint_saves_as_its_moe_sibling(case, layers, sibling, tmp_path):
    write_checkpoint(tmp_path / "dense", CONFIGS[case])
    model = upcycle(from_pretrained(tmp_path / "dense", dtype="float64"), 4, 2, layers=layers, noise=0.2, generator=0)
    logits = model(HF_IDS).numpy()
    model.save_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == sibling and config["num_experts_per_tok"] == 2
    expected = reference_logits(config, load_safetensors(tmp_path / "moe" / "model.safetensors"), HF_IDS)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert np.array_equal(from_pretrained(tmp_path / "moe", dtype="float64")(HF_IDS).numpy(), logits)


@pytest.mark.parametrize("case, layers, sibling", HF_CASES)
def test_upcycled_checkpoint_loads_in_transformers(case, layers, sibling, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    write_checkpoint(tmp_path / "dense", CONFIGS[case])
    model = upcycle(from_pretrained(tmp_path / "dense", dtype="float64"), 4, 2, layers=layers, noise=0.2, generator=0)
    model.save_pretrained(tmp_path / "moe")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float64,
                                                                  experts_implementation="eager").eval()
    assert type(reference).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[sibling]
    with torch.no_grad():
        expected = reference(torch.tensor(HF_IDS)).logits.double().numpy()
    np.testing.assert_allclose(model(HF_IDS).numpy(), expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("case, kwargs, message", [
    ("qwen2", {}, "no MoE sibling"),
    ("llama", {"layers": [0, 1]}, "needs every layer upcycled"),
    ("llama_tied_bias", {}, "attention biases"),
    ("mixtral", {}, "all are MoE already"),
    ("qwen3_moe", {}, "is an MoE type"),
    ("qwen3", {"router": "sigmoid"}, "fix the router"),
])
def test_checkpoint_refusals(case, kwargs, message, tmp_path):
    write_checkpoint(tmp_path, CONFIGS[case])
    model = from_pretrained(tmp_path, dtype="float64")
    spec = model.spec
    with pytest.raises(ValueError, match=message):
        upcycle(model, 4, 2, **kwargs)
    assert model.spec is spec
