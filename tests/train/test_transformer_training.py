"""MoETransformer training and sampling: float64 gradient checks of the whole loss, a few AdamW steps, and
generate() (lengths, determinism, greedy top-k 1, top-k support, temperature, context cropping, mode)."""
import math

import numpy as np
import pytest

import tinymoe
from tinymoe.engine.gradcheck import gradcheck
from tinymoe.models import MoETransformer
from tinymoe.optim import AdamW
from transformer_helpers import VOCAB, numpy_kernels, random_tokens, tiny_config  # noqa: F401  (autouse fixture)


# ----- gradients ---------------------------------------------------------------------------------------------
GRADCHECK_PARAMETERS = ["token_embedding.weight", "position_embedding.weight", "blocks.0.attention.query.weight",
                        "blocks.0.ffn.router.weight", "blocks.1.ffn.experts.w2", "blocks.1.ffn_norm.weight",
                        "final_norm.weight"]


@pytest.mark.parametrize("overrides", [dict(), dict(router="noisy", moe_layers=[1]), dict(n_shared_experts=1)],
                         ids=["softmax", "noisy+dense", "shared"])
def test_gradcheck_of_the_total_loss(overrides):
    config = tiny_config(max_seq_len=5, aux_coef=0.5, z_coef=0.1, noisy_coef=0.3, **overrides)
    model = MoETransformer(config, seed=11)
    parameters = dict(model.named_parameters())
    chosen = [parameters[name] for name in GRADCHECK_PARAMETERS if name in parameters]
    tokens, targets = random_tokens((2, 5), seed=12), random_tokens((2, 5), seed=13)

    def loss(*_):
        for layer in model.moe_layers():
            layer.reseed(0)  # the noisy router's noise: the same draw at every evaluation
        return model.loss(tokens, targets)[0]

    assert gradcheck(loss, chosen, n_directions=3, exact_max_elements=40)


def test_a_few_adamw_steps_lower_the_loss_on_a_fixed_batch():
    model = MoETransformer(tiny_config(dtype="float32", d_model=16, max_seq_len=8), seed=0)
    optimizer = AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    tokens = random_tokens((4, 8), seed=1)
    targets = np.roll(tokens, -1, axis=1)
    losses = []
    for _ in range(25):
        total, parts = model.loss(tokens, targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(parts["cross_entropy"])
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.1)  # small init: near uniform at first
    assert losses[-1] < 0.5 * losses[0]


# ----- generate ----------------------------------------------------------------------------------------------
def _next_logits(model, context):
    window = np.asarray(context[-model.config.max_seq_len:])[None, :]
    return model(window).numpy()[0, -1]


@pytest.fixture(scope="module")
def sampling_model():
    with tinymoe.kernels.use("numpy"):
        return MoETransformer(tiny_config(), seed=21)


def test_generate_returns_the_requested_number_of_valid_ids(sampling_model):
    for length in (0, 1, 12):
        new = sampling_model.generate([1, 2, 3], length, generator=0)
        assert len(new) == length
        assert all(isinstance(t, int) and 0 <= t < VOCAB for t in new)


def test_generate_is_deterministic_with_a_seed(sampling_model):
    first = sampling_model.generate([4], 15, temperature=2.0, generator=5)
    assert sampling_model.generate([4], 15, temperature=2.0, generator=5) == first
    outputs = {tuple(sampling_model.generate([4], 15, temperature=2.0, generator=seed)) for seed in range(5)}
    assert len(outputs) > 1


def test_top_k_one_and_low_temperature_are_greedy(sampling_model):
    model = sampling_model.eval()
    context, greedy = [2, 7], []
    for _ in range(8):
        token = int(np.argmax(_next_logits(model, context)))
        greedy.append(token)
        context.append(token)
    model.train()
    assert model.generate([2, 7], 8, temperature=1.0, top_k=1, generator=0) == greedy
    assert model.generate([2, 7], 8, temperature=1.0, top_k=1, generator=99) == greedy
    assert model.generate([2, 7], 8, temperature=1e-4, generator=3) == greedy


def test_top_k_samples_only_among_the_k_best(sampling_model):
    model = sampling_model
    prompt = [0, 5]
    new = model.generate(prompt, 20, temperature=5.0, top_k=3, generator=1)
    model.eval()
    context = list(prompt)
    for token in new:
        logits = _next_logits(model, context)
        assert token in np.argsort(-logits)[:3]
        context.append(token)
    model.train()


def test_high_temperature_spreads_the_samples(sampling_model):
    cold = sampling_model.generate([3], 40, temperature=0.05, generator=2)
    hot = sampling_model.generate([3], 40, temperature=50.0, generator=2)
    assert len(set(hot)) > len(set(cold))


def test_generate_crops_long_prompts_to_the_context_window(sampling_model):
    long_prompt = random_tokens(20, seed=3).tolist()
    cropped = long_prompt[-8:]
    assert sampling_model.generate(long_prompt, 5, generator=4) == sampling_model.generate(cropped, 5, generator=4)


def test_generate_restores_the_mode_and_checks_arguments(sampling_model):
    sampling_model.train()
    sampling_model.generate([1], 2, generator=0)
    assert sampling_model.training
    sampling_model.eval()
    sampling_model.generate([1], 2, generator=0)
    assert not sampling_model.training
    sampling_model.train()
    for bad in (-0.5, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sampling_model.generate([1], 2, temperature=bad)
    with pytest.raises((ValueError, TypeError), match="top_k"):
        sampling_model.generate([1], 2, top_k=0)
