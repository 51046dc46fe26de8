"""MoETransformer against a NumPy forward written here from the issue's description:

    h = E[tokens] + P[positions]
    per block: h += Attn(RMSNorm(h)) (causal, multi-head);  h += FFN(RMSNorm(h)) (MoE or dense SwiGLU)
    logits = RMSNorm(h) Eᵀ (tied head);  loss = CE + Σ_layers (aux_coef·aux + z_coef·z)

plus causality, the tied head, moe_layers, every MoE option reached from the config, float64 gradient checks
of the whole loss, a few optimizer steps, and generate().
"""
import math

import numpy as np
import pytest

import tinymoe
from tinymoe.engine.gradcheck import gradcheck
from tinymoe.models import MoETransformer, TransformerConfig
from tinymoe.optim import AdamW

VOCAB = 11


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


def tiny_config(**overrides):
    values = dict(vocab_size=VOCAB, d_model=8, n_layers=2, n_heads=2, max_seq_len=8, d_ff=6, n_experts=4, top_k=2,
                  dtype="float64")
    values.update(overrides)
    return TransformerConfig(**values)


def random_tokens(shape, seed=0, vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


# ----- an independent NumPy forward --------------------------------------------------------------------------
def _rms_norm(x, weight, eps=1e-6):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def _softmax(z):
    shifted = np.exp(z - z.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _silu(x):
    return x / (1 + np.exp(-x))


def _swiglu(x, w1, w3, w2):
    return (_silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _attention(x, state, prefix, n_heads):
    batch, length, width = x.shape
    head = width // n_heads

    def split(name):
        projected = x @ state[f"{prefix}.{name}.weight"].T
        return projected.reshape(batch, length, n_heads, head).transpose(0, 2, 1, 3)

    q, k, v = split("query"), split("key"), split("value")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head)
    future = np.triu(np.ones((length, length), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    attended = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
    return attended @ state[f"{prefix}.out.weight"].T


def _moe(rows, state, prefix, n_experts, top_k):
    """Dropless softmax top-k with renormalised weights; returns (out, aux, z)."""
    logits = rows @ state[f"{prefix}.router.weight"].T
    probs = _softmax(logits)
    out = np.zeros_like(rows)
    counts = np.zeros(n_experts)
    for t, row in enumerate(rows):
        chosen = np.argsort(-probs[t], kind="stable")[:top_k]
        weights = probs[t, chosen] / probs[t, chosen].sum()
        for expert, weight in zip(chosen, weights):
            counts[expert] += 1
            out[t] += weight * _swiglu(row, state[f"{prefix}.experts.w1"][expert], state[f"{prefix}.experts.w3"][expert],
                                       state[f"{prefix}.experts.w2"][expert])
    fraction = counts / counts.sum()
    aux = n_experts * float((fraction * probs.mean(axis=0)).sum())
    peak = logits.max(axis=1)
    lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
    return out, aux, float((lse**2).mean())


def reference_forward(model, tokens):
    """(logits, [aux per MoE layer], [z per MoE layer]) from the model's weights, in float64."""
    c = model.config
    state = {name: np.asarray(value, dtype=np.float64) for name, value in model.state_dict().items()}
    batch, length = tokens.shape
    h = state["token_embedding.weight"][tokens] + state["position_embedding.weight"][:length]
    auxes, zs = [], []
    for index in range(c.n_layers):
        prefix = f"blocks.{index}"
        h = h + _attention(_rms_norm(h, state[f"{prefix}.attention_norm.weight"]), state, f"{prefix}.attention",
                           c.n_heads)
        rows = _rms_norm(h, state[f"{prefix}.ffn_norm.weight"]).reshape(-1, c.d_model)
        if f"{prefix}.ffn.router.weight" in state:
            out, aux, z = _moe(rows, state, f"{prefix}.ffn", c.n_experts, c.top_k)
            auxes.append(aux)
            zs.append(z)
        else:
            out = _swiglu(rows, state[f"{prefix}.ffn.w1"], state[f"{prefix}.ffn.w3"], state[f"{prefix}.ffn.w2"])
        h = h + out.reshape(h.shape)
    logits = _rms_norm(h, state["final_norm.weight"]) @ state["token_embedding.weight"].T
    return logits, auxes, zs


def reference_cross_entropy(logits, targets):
    flat = logits.reshape(-1, logits.shape[-1])
    peak = flat.max(axis=1, keepdims=True)
    log_probs = flat - peak - np.log(np.exp(flat - peak).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(flat)), targets.reshape(-1)].mean())


@pytest.mark.parametrize("moe_layers", [["all"], [1], [0]], ids=["all-moe", "dense-then-moe", "moe-then-dense"])
def test_forward_matches_the_numpy_reference(moe_layers):
    model = MoETransformer(tiny_config(moe_layers=moe_layers), seed=3)
    tokens = random_tokens((3, 7), seed=1)
    logits = model(tokens)
    assert logits.shape == (3, 7, VOCAB)
    expected, _, _ = reference_forward(model, tokens)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-9, atol=1e-11)


def test_total_loss_is_cross_entropy_plus_weighted_router_losses():
    model = MoETransformer(tiny_config(n_layers=3, moe_layers=[0, 2], aux_coef=0.3, z_coef=0.05), seed=4)
    tokens, targets = random_tokens((2, 8), seed=2), random_tokens((2, 8), seed=3)
    total, parts = model.loss(tokens, targets)
    logits, auxes, zs = reference_forward(model, tokens)
    cross_entropy = reference_cross_entropy(logits, targets)
    assert len(auxes) == 2
    assert parts["cross_entropy"] == pytest.approx(cross_entropy, rel=1e-10)
    assert total.item() == pytest.approx(cross_entropy + 0.3 * sum(auxes) + 0.05 * sum(zs), rel=1e-10)
    assert parts["aux"] == pytest.approx(np.mean(auxes), rel=1e-10)  # reported per layer (1.0 = balanced)
    assert parts["z"] == pytest.approx(np.mean(zs), rel=1e-10)
    assert parts["noisy"] == 0.0
    assert parts["total"] == total.item()


def test_coefficients_scale_only_the_router_terms():
    tokens, targets = random_tokens((2, 8), seed=5), random_tokens((2, 8), seed=6)
    totals = {}
    for aux_coef, z_coef in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)]:
        model = MoETransformer(tiny_config(aux_coef=aux_coef, z_coef=z_coef), seed=0)
        totals[aux_coef, z_coef] = model.loss(tokens, targets)[0].item()
    aux_sum = totals[1.0, 0.0] - totals[0.0, 0.0]
    z_sum = totals[0.0, 1.0] - totals[0.0, 0.0]
    assert aux_sum > 0 and z_sum > 0
    assert totals[0.5, 2.0] == pytest.approx(totals[0.0, 0.0] + 0.5 * aux_sum + 2.0 * z_sum, rel=1e-10)


def test_noisy_router_losses_enter_the_total():
    config = tiny_config(router="noisy", aux_coef=0.0, z_coef=0.0, noisy_coef=0.7)
    model = MoETransformer(config, seed=1)
    tokens, targets = random_tokens((2, 8), seed=7), random_tokens((2, 8), seed=8)
    for layer in model.moe_layers():
        layer.reseed(0)
    total, parts = model.loss(tokens, targets)
    noisy = sum(layer.importance_loss.item() + layer.load_loss.item() for layer in model.moe_layers())
    assert noisy > 0
    assert parts["noisy"] == pytest.approx(noisy / 2, rel=1e-10)
    assert total.item() == pytest.approx(parts["cross_entropy"] + 0.7 * noisy, rel=1e-10)
    assert parts["total"] == total.item()


# ----- structure ---------------------------------------------------------------------------------------------
def test_output_shapes_and_input_checks():
    model = MoETransformer(tiny_config(), seed=0)
    assert model(random_tokens((1, 1))).shape == (1, 1, VOCAB)
    assert model(random_tokens((4, 8))).shape == (4, 8, VOCAB)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens((1, 9)))
    with pytest.raises(ValueError):
        model(random_tokens((8,)))


def test_causality_future_tokens_do_not_change_earlier_logits():
    model = MoETransformer(tiny_config(), seed=2).eval()
    tokens = random_tokens((2, 8), seed=9)
    base = model(tokens).numpy()
    for position in (1, 4, 7):
        changed = tokens.copy()
        changed[0, position] = (changed[0, position] + 1) % VOCAB
        logits = model(changed).numpy()
        np.testing.assert_allclose(logits[0, :position], base[0, :position], rtol=1e-12, atol=1e-12)
        assert np.abs(logits[0, position:] - base[0, position:]).max() > 1e-6
        np.testing.assert_allclose(logits[1], base[1], rtol=1e-12, atol=1e-12)  # other sequences untouched


def test_positions_matter():
    model = MoETransformer(tiny_config(), seed=2).eval()
    logits = model(np.full((1, 4), 3)).numpy()
    assert np.abs(logits[0, 0] - logits[0, 3]).max() > 1e-6


def test_output_head_is_tied_to_the_token_embedding():
    model = MoETransformer(tiny_config(), seed=5).eval()
    embedding = model.token_embedding.weight
    assert all(p.shape != (VOCAB, 8) or p is embedding for p in model.parameters())  # no separate head matrix
    tokens = np.array([[0, 1, 2, 3, 4]])  # ids 5..10 never enter the model
    base = model(tokens).numpy()
    embedding.data[7] += 1.0  # a row only the head reads
    logits = model(tokens).numpy()
    changed_columns = np.flatnonzero(np.abs(logits - base).max(axis=(0, 1)) > 1e-9)
    assert changed_columns.tolist() == [7]

    captured = []
    original = model.final_norm.forward
    model.final_norm.forward = lambda h: captured.append(original(h)) or captured[-1]
    logits = model(tokens).numpy()
    np.testing.assert_allclose(logits, captured[0].numpy() @ embedding.data.T, rtol=1e-12)


def test_head_gradient_reaches_embedding_rows_of_absent_tokens():
    model = MoETransformer(tiny_config(), seed=5)
    total, _ = model.loss(np.array([[0, 1, 2, 3]]), np.array([[1, 2, 3, 4]]))
    total.backward()
    grad = model.token_embedding.weight.grad
    assert np.abs(grad[9]).max() > 0  # id 9 appears nowhere: only the tied head can give it a gradient


@pytest.mark.parametrize("moe_layers, expected", [(["all"], [0, 1, 2]), ([1], [1]), ([0, 2], [0, 2]), ([], [])])
def test_moe_layers_selects_which_blocks_are_moe(moe_layers, expected):
    model = MoETransformer(tiny_config(n_layers=3, moe_layers=moe_layers), seed=0)
    names = {name for name, _ in model.named_parameters()}
    assert [i for i in range(3) if f"blocks.{i}.ffn.router.weight" in names] == expected
    assert len(model.moe_layers()) == len(expected)
    for i in set(range(3)) - set(expected):  # dense: a SwiGLU of the active width top_k · d_ff
        assert dict(model.named_parameters())[f"blocks.{i}.ffn.w1"].shape == (2 * 6, 8)
    total, parts = model.loss(random_tokens((1, 5)), random_tokens((1, 5), seed=1))
    assert math.isfinite(total.item())
    if not expected:
        assert parts["aux"] == parts["z"] == 0.0
        assert total.item() == pytest.approx(parts["cross_entropy"], rel=1e-12)


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
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sampling_model.generate([1], 2, temperature=bad)
    with pytest.raises((ValueError, TypeError), match="top_k"):
        sampling_model.generate([1], 2, top_k=0)
