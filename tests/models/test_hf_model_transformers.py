"""HFCausalLM against transformers itself (float64, tiny random models): logits of each supported model_type
loaded from transformers' save_pretrained, tinymoe's save_pretrained reloaded by transformers, bfloat16
checkpoints, the router's load-balance loss, and one SGD fine-tuning step.

transformers computes RMSNorm, the rotary angles and the router softmax in float32 even in a float64 model,
so the two agree to about 1e-6 of the logits' scale (measured: at most 6.3e-7 of max |logit| with O(1)
weights, DeepSeek-V3 with YaRN 6.7e-7, Qwen2-MoE 3.6e-7, GPT-OSS 2.1e-7; tested at 2e-6). The fine-tuning step's updated weights agree to 1e-6."""
import numpy as np
import pytest

import tinymoe as tm
from test_hf_config import CASES, SMALL
from tinymoe.io import load_safetensors
from tinymoe.models.hf_checkpoint import checkpoint_tensors
from tinymoe.models.hf_model import HFCausalLM
from tinymoe.models.pretrained import from_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SUPPORTED = ["llama", "llama_tied_bias", "qwen2", "qwen3", "mixtral", "mixtral_sliding", "qwen3_moe", "olmoe",
             "qwen2_moe", "gpt_oss", "deepseek_v3", "deepseek_v3_no_q_lora"]
# Changes to test_hf_config's CASES here: transformers' MLA runs only with num_key_value_heads = heads (its k/v
# have every head); a swiglu_limit GPT-OSS's clamps reach with these O(1) weights.
OVERRIDES = {"deepseek_v3": dict(num_key_value_heads=4), "deepseek_v3_no_q_lora": dict(num_key_value_heads=4),
             "gpt_oss": dict(swiglu_limit=1.0, sliding_window=5)}


def case_config(case, **extra_fields):
    """The transformers config object of `case` (SMALL, the case's fields, OVERRIDES)."""
    config_class, _, extra = CASES[case]
    return getattr(transformers, config_class)(**{**SMALL, **extra, **OVERRIDES.get(case, {})}, **extra_fields)


IDS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (2, 12))  # 12 tokens > the sliding window 8
LOGIT_TOLERANCE = 2e-6  # of max |logit|: transformers' float32 RMSNorm, rope angles and router softmax


def transformers_model(case, seed=0, dtype=None):
    """A tiny transformers model of `case` with O(1) random weights (norms near 1), float64, eager experts."""
    model = getattr(transformers, CASES[case][1])(case_config(case, experts_implementation="eager"))
    model = model.eval().to(dtype or torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
        for name, buffer in model.named_buffers():  # DeepSeek's selection bias (zeros by default)
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator, dtype=torch.float64))
    return model


def randomize(model, seed):
    """O(1) weights for a tinymoe HFCausalLM (its sinks, router biases and selection biases start at 0)."""
    rng = np.random.default_rng(seed)
    for name, parameter in model.named_parameters():
        noise = rng.standard_normal(parameter.shape)
        parameter.data = (1 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise).astype(parameter.dtype)
    for layer in model.moe_layers():
        if layer.router.kind == "sigmoid":
            layer.router.bias = 0.3 * rng.standard_normal(layer.n_experts)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.double().numpy()


@pytest.mark.parametrize("case", SUPPORTED)
def test_logits_match_transformers(case, tmp_path):
    reference = transformers_model(case)
    reference.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype="float64")
    expected = torch_logits(reference, IDS)
    assert np.abs(expected).max() > 0.5  # weights large enough that routing and attention matter
    np.testing.assert_allclose(ours(IDS).numpy(), expected, rtol=0, atol=LOGIT_TOLERANCE * np.abs(expected).max())


def test_sharded_transformers_checkpoint_loads(tmp_path):
    reference = transformers_model("mixtral")
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    expected = torch_logits(reference, IDS)
    np.testing.assert_allclose(from_pretrained(tmp_path, dtype="float64")(IDS).numpy(), expected, rtol=0,
                               atol=LOGIT_TOLERANCE * np.abs(expected).max())


@pytest.mark.parametrize("case", ["llama_tied_bias", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss",
                                  "deepseek_v3", "deepseek_v3_no_q_lora"])
def test_tinymoe_save_pretrained_reloads_in_transformers(case, tmp_path):
    config = case_config(case).to_dict()
    ours = HFCausalLM(config, dtype="float64", seed=11)
    if case in ("qwen2_moe", "gpt_oss", "deepseek_v3", "deepseek_v3_no_q_lora"):
        randomize(ours, seed=11)
    ours.save_pretrained(tmp_path, max_shard_bytes=None if case != "mixtral" else 20_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                                 experts_implementation="eager").eval()
    expected = torch_logits(reloaded, IDS)
    np.testing.assert_allclose(ours(IDS).numpy(), expected, rtol=0, atol=LOGIT_TOLERANCE * np.abs(expected).max())


def test_bfloat16_checkpoint_loads(tmp_path):
    reference = transformers_model("qwen3_moe").to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype="float32")
    assert ours.model.embed_tokens.weight.dtype == np.float32
    on_disk = {key: value.float().numpy() for key, value in reference.state_dict().items()}
    parameters = dict(ours.named_parameters())
    np.testing.assert_array_equal(parameters["model.layers.1.mlp.experts.w1"].numpy(),
                                  on_disk["model.layers.1.mlp.experts.gate_up_proj"][:, :8])
    np.testing.assert_array_equal(parameters["model.embed_tokens.weight"].numpy(), on_disk["model.embed_tokens.weight"])
    # the same bf16 values computed in float64 (a fresh model: .to(bfloat16) also rounded rope's inv_freq buffer)
    widened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                                experts_implementation="eager").eval()
    expected = torch_logits(widened, IDS)
    ours64 = from_pretrained(tmp_path, dtype="float64")
    np.testing.assert_allclose(ours64(IDS).numpy(), expected, rtol=0, atol=LOGIT_TOLERANCE * np.abs(expected).max())


def test_aux_loss_is_transformers_over_top_k(tmp_path):
    reference = transformers_model("qwen3_moe")  # a single MoE layer (decoder_sparse_step=2): no cross-layer mean
    reference.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype="float64")
    ours(IDS)
    with torch.no_grad():
        expected = reference(torch.tensor(IDS), output_router_logits=True).aux_loss.item()
    (loss,) = ours.aux_losses()
    assert loss.item() * reference.config.num_experts_per_tok == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("case", ["qwen3", "mixtral", "olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_one_sgd_step_matches_torch(case, tmp_path):
    reference = transformers_model(case)
    reference.save_pretrained(tmp_path / "before")
    ours = from_pretrained(tmp_path / "before", dtype="float64").train()
    inputs, targets = IDS[:, :-1], IDS[:, 1:]
    learning_rate = 0.5

    logits = ours(inputs)
    loss = tm.functional.cross_entropy(logits.reshape(-1, SMALL["vocab_size"]), targets.reshape(-1))
    loss.backward()
    tm.optim.SGD(ours.parameters(), lr=learning_rate).step()

    reference.train()
    torch_logits_ = reference(torch.tensor(inputs)).logits
    torch_loss = torch.nn.functional.cross_entropy(torch_logits_.reshape(-1, SMALL["vocab_size"]),
                                                   torch.tensor(targets).reshape(-1))
    torch_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=learning_rate).step()
    reference.save_pretrained(tmp_path / "after")

    assert loss.item() == pytest.approx(torch_loss.item(), rel=1e-7)
    before, after, updated = (load_safetensors(tmp_path / "before" / "model.safetensors"),
                              load_safetensors(tmp_path / "after" / "model.safetensors"), checkpoint_tensors(ours))
    assert set(updated) == set(after)
    moved = 0.0
    for key in after:
        np.testing.assert_allclose(updated[key], after[key], rtol=0, atol=1e-6, err_msg=key)
        moved = max(moved, float(np.abs(after[key] - before[key]).max()))
    assert moved > 1e-2  # the step changed the weights far more than the tolerance
