"""MoETransformer against a NumPy forward written here from the issue's description:

    h = E[tokens] + P[positions]
    per block: h += Attn(RMSNorm(h)) (causal, multi-head);  h += FFN(RMSNorm(h)) (MoE or dense SwiGLU)
    logits = RMSNorm(h) Eᵀ (tied head);  loss = CE + Σ_layers (aux_coef·aux + z_coef·z)

plus causality, the tied head and moe_layers. The config and its options: test_transformer_config.py;
gradients, optimizer steps and generate(): test_transformer_training.py.
"""
import math

import numpy as np
import pytest

from tinymoe.models import MoETransformer
from transformer_helpers import VOCAB, numpy_kernels, random_tokens, tiny_config  # noqa: F401  (autouse fixture)


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
            out, aux, z = _moe(rows, state, f"{prefix}.ffn", c.moe.n_experts, c.moe.top_k)
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
