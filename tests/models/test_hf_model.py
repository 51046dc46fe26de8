"""HFCausalLM without torch: logits of every supported model_type against a plain-loop NumPy decoder on the same
checkpoint (float64), router aux losses, gradients of the whole model against finite differences, and errors."""
import numpy as np
import pytest

import tinymoe as tm
from hf_model_helpers import CONFIGS, reference_logits, write_checkpoint
from tinymoe.models.hf_model import HFCausalLM, require_supported
from tinymoe.models.pretrained import from_pretrained

IDS = np.array([[1, 5, 0, 7, 12, 3, 3, 9], [4, 4, 2, 11, 0, 6, 8, 1]])


@pytest.mark.parametrize("case", list(CONFIGS))
def test_logits_equal_the_numpy_reference(case, tmp_path):
    tensors = write_checkpoint(tmp_path, CONFIGS[case], seed=1)
    model = from_pretrained(tmp_path, dtype="float64")
    logits = model(IDS)
    assert logits.shape == (2, 8, 13) and logits.dtype == np.float64
    np.testing.assert_allclose(logits.numpy(), reference_logits(CONFIGS[case], tensors, IDS), rtol=0, atol=1e-11)


def test_logits_and_generation_on_each_device(tmp_path, device):
    tensors = write_checkpoint(tmp_path, CONFIGS["mixtral_sliding"], seed=1)
    model = from_pretrained(tmp_path, dtype="float64", device=device)
    assert model.device == device
    logits = model(IDS)
    np.testing.assert_allclose(logits.numpy(), reference_logits(CONFIGS["mixtral_sliding"], tensors, IDS), atol=1e-11)
    greedy = model.generate(IDS[:, :4], max_new_tokens=5)
    np.testing.assert_array_equal(greedy, from_pretrained(tmp_path, dtype="float64").generate(IDS[:, :4], max_new_tokens=5))


def test_float32_model_is_close_to_the_float64_reference(tmp_path):
    tensors = write_checkpoint(tmp_path, CONFIGS["qwen3_moe"], seed=2)
    logits = from_pretrained(tmp_path)(IDS)  # dtype="float32" by default
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits.numpy(), reference_logits(CONFIGS["qwen3_moe"], tensors, IDS), atol=2e-5)


def record_inputs(layer, inputs):
    """Make `layer` append the (T, d) rows it is called with to `inputs`."""
    original = layer.forward

    def forward(x):
        inputs.append(x.numpy().reshape(-1, x.shape[-1]))
        return original(x)
    layer.forward = forward


@pytest.mark.parametrize("case, moe_layers", [("mixtral", 3), ("qwen3_moe", 1), ("olmoe", 3), ("llama", 0)])
def test_aux_losses_one_per_moe_layer(case, moe_layers):
    model = HFCausalLM(CONFIGS[case], dtype="float64", seed=0)
    if moe_layers == 0:
        model(IDS)
        assert model.aux_losses() == []
        return
    with pytest.raises(RuntimeError, match="run a forward first"):
        model.aux_losses()
    inputs = []
    for layer in model.moe_layers():
        record_inputs(layer, inputs)
    model(IDS)
    losses = model.aux_losses()
    assert len(losses) == len(inputs) == moe_layers
    for layer, x, loss in zip(model.moe_layers(), inputs, losses):
        # E·Σ_e f_e P_e: f the share of the T·k choices picking e, P the mean router probability (formula)
        logits = x @ layer.router.weight.numpy().T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        chosen = np.argsort(-probs, axis=1, kind="stable")[:, :layer.top_k]
        share = np.bincount(chosen.ravel(), minlength=layer.n_experts) / chosen.size
        assert loss.item() == pytest.approx(layer.n_experts * (share * probs.mean(axis=0)).sum(), rel=1e-12)


@pytest.mark.parametrize("case", ["mixtral_sliding", "qwen3_moe", "olmoe", "llama_tied_bias", "gpt_oss",
                                  "deepseek_v3", "qwen2_moe"])
def test_gradients_of_the_logits_match_finite_differences(case):
    model = HFCausalLM(CONFIGS[case], dtype="float64", seed=3)
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():  # sinks, biases and shared gates start at 0: move them off it
        if name.endswith(("sinks", "logit_bias", "shared_gate")):
            parameter.data = np.random.default_rng(5).normal(0, 0.5, parameter.shape)
    first_attention = next(name for name in parameters
                           if name.startswith("model.layers.0.self_attn.") and name.endswith("proj.weight"))
    names = ["model.embed_tokens.weight", first_attention, "model.layers.1.mlp.w1"
             if "model.layers.1.mlp.w1" in parameters else "model.layers.1.mlp.experts.w1",
             "model.layers.2.post_attention_layernorm.weight", "model.norm.weight"]
    names += [name for name in parameters if name.endswith(("k_norm.weight", "router.weight", "q_proj.bias"))][:2]
    names += [name for name in parameters if name.endswith(("sinks", "logit_bias", "experts.b3", "shared_gate",
                                                            "kv_b_proj.weight", "kv_a_layernorm.weight",
                                                            "layers.1.mlp.shared.w2"))][:4]
    names = list(dict.fromkeys(names))  # each input once
    inputs = [parameters[name] for name in names]
    ids = IDS[:, :6]
    assert tm.gradcheck(lambda *_: model(ids), inputs, n_directions=3, exact_max_elements=0, atol=1e-7, rtol=1e-5)


def test_cross_entropy_backward_reaches_every_parameter():
    model = HFCausalLM(CONFIGS["qwen3_moe"], dtype="float64", seed=0)
    logits = model(IDS)
    loss = tm.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), IDS[:, 1:].reshape(-1))
    (loss + 0.01 * sum(model.aux_losses())).backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert missing == []


def test_a_model_type_without_a_model_raises_naming_it():
    with pytest.raises(NotImplementedError, match="model_type='mistral' is not supported"):
        require_supported("mistral")


@pytest.mark.parametrize("ids, match", [
    (np.array([1, 2, 3]), r"\(batch, length\) integer array"),
    (np.array([[1.0, 2.0]]), "integer array"),
    (np.zeros((1, 0), dtype=np.int64), "length >= 1"),
    (np.array([[1, 13]]), r"values in \[1, 13\]; expected \[0, vocab_size=13\)"),
    (np.array([[-1, 2]]), "values in"),
])
def test_bad_input_ids_raise(ids, match):
    with pytest.raises(ValueError, match=match):
        HFCausalLM(CONFIGS["llama"])(ids)


def test_bad_construction_arguments_raise():
    with pytest.raises(TypeError, match="config must be a config.json dict or an HFModelSpec"):
        HFCausalLM("config.json")
    with pytest.raises(TypeError, match="dtype=int32 is not supported"):
        HFCausalLM(CONFIGS["llama"], dtype="int32")


def test_the_pad_row_of_the_embedding_gets_no_gradient():
    """transformers builds nn.Embedding(vocab, hidden, padding_idx=pad_token_id): that row never trains."""
    model = HFCausalLM({**CONFIGS["qwen3"], "pad_token_id": 4}, dtype="float64", seed=0)
    logits = model(IDS)  # IDS hold token 4 (a pad) three times
    reference = HFCausalLM(CONFIGS["qwen3"], dtype="float64", seed=0)(IDS)
    np.testing.assert_array_equal(logits.numpy(), reference.numpy())  # the forward is unchanged
    logits.sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert np.all(grad[4] == 0) and np.all(np.abs(grad[[1, 5, 0]]).sum(axis=1) > 0)
