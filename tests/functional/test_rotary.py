"""rotary_frequencies and apply_rotary: frequencies and scaling against transformers' rope init functions for
every rope type, the rotation against transformers' apply_rotary_pos_emb (Llama), GPT-OSS's and DeepSeek's
interleaved variant, partial rotary, the relative-position property, hand-written gradients, errors."""
import math

import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf
from tinymoe.functional.rotary import apply_rotary, rotary_frequencies

HEAD_DIM = 64

# rope_parameters dicts as transformers' configs hold them (rope_theta inside, as transformers 5 writes it).
ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # wavelengths 6.3 .. 4.7e4 cross both llama3 thresholds (8192 / 1 and 8192 / 4): all three regions occur
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn_gpt_oss": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
    "yarn_deepseek": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    "yarn_mscale_differs": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "mscale": 0.707,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 2048},
    "yarn_attention_factor": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 1024},
    "yarn_defaults": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                      "original_max_position_embeddings": 512},
}


def transformers_rope(rope_parameters, head_dim=HEAD_DIM, max_positions=131072):
    """(inv_freq float64 NumPy, attention_scaling) from transformers' own init function for this config."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                      max_position_embeddings=max_positions, rope_parameters=dict(rope_parameters))
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        module = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
        inv_freq, scaling = module.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.double().numpy(), float(scaling)


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_frequencies_and_scaling_match_transformers(name):
    params = ROPE_CASES[name]
    expected_freq, expected_scaling = transformers_rope(params)
    inv_freq, scaling = rotary_frequencies(HEAD_DIM, params["rope_theta"], params)
    assert inv_freq.dtype == np.float64 and inv_freq.shape == (HEAD_DIM // 2,)
    np.testing.assert_allclose(inv_freq, expected_freq, rtol=2e-6)  # transformers computes in float32
    assert scaling == pytest.approx(expected_scaling, rel=1e-12)


def test_scaled_types_really_change_the_frequencies():
    """Guards the comparison above against two schedules that are accidentally the same."""
    plain, _ = rotary_frequencies(HEAD_DIM, 10000.0)
    np.testing.assert_allclose(plain, [10000.0 ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)], rtol=1e-14)
    llama3, _ = rotary_frequencies(HEAD_DIM, 10000.0, ROPE_CASES["llama3"])
    assert llama3[0] == plain[0] and llama3[-1] == pytest.approx(plain[-1] / 8)
    assert np.any((llama3 < plain) & (llama3 > plain / 8))  # the blended middle band
    yarn, scaling = rotary_frequencies(HEAD_DIM, 150000.0, ROPE_CASES["yarn_gpt_oss"])
    assert scaling == pytest.approx(0.1 * math.log(32) + 1)


def test_yarn_factor_defaults_to_max_positions_over_original():
    params = {"rope_type": "yarn", "original_max_position_embeddings": 1024}
    ours = rotary_frequencies(HEAD_DIM, 10000.0, params, max_positions=8192)
    explicit = rotary_frequencies(HEAD_DIM, 10000.0, {**params, "factor": 8.0})
    np.testing.assert_array_equal(ours[0], explicit[0])
    assert ours[1] == explicit[1]


def _torch_cos_sin(inv_freq, positions, scaling, concatenate=True):
    """cos/sin as transformers' rotary modules build them, in float64: (B or 1, L, d) for positions (B, L)."""
    torch = pytest.importorskip("torch")
    positions = torch.as_tensor(np.atleast_2d(positions), dtype=torch.float64)
    freqs = positions[..., None] * torch.as_tensor(inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1) if concatenate else freqs
    return emb.cos() * scaling, emb.sin() * scaling


@pytest.mark.parametrize("per_sequence_positions", [False, True])
@pytest.mark.parametrize("name", ["default", "yarn_gpt_oss"])
def test_half_layout_matches_llama_apply_rotary_pos_emb(name, per_sequence_positions):
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(0)
    head_dim, length = 16, 7
    params = ROPE_CASES[name]
    inv_freq, scaling = rotary_frequencies(head_dim, params["rope_theta"], params)
    q, k = rng.standard_normal((2, 3, length, head_dim)), rng.standard_normal((2, 1, length, head_dim))
    positions = rng.integers(0, 5000, size=(2, length)) if per_sequence_positions else np.arange(10, 10 + length)
    cos, sin = _torch_cos_sin(inv_freq, positions, scaling)
    expected_q, expected_k = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(k), cos, sin)
    for array, expected in ((q, expected_q), (k, expected_k)):
        out = apply_rotary(tm.tensor(array, dtype="float64"), positions, inv_freq, scaling)
        np.testing.assert_allclose(host(out), expected.numpy(), rtol=1e-12, atol=1e-12)


def test_matches_the_whole_transformers_rotary_module_in_float32():
    """The module computes inv_freq and angles in float32, hence the looser tolerance."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, apply_rotary_pos_emb

    params = ROPE_CASES["yarn_gpt_oss"]
    config = transformers.GptOssConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       rope_parameters=dict(params))
    rope = GptOssRotaryEmbedding(config)
    positions = np.arange(0, 40, 3)
    q = np.random.default_rng(1).standard_normal((1, 2, positions.size, 16)).astype(np.float32)
    cos, sin = rope(torch.as_tensor(q), torch.as_tensor(positions)[None])
    expected, _ = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(q), cos, sin)
    inv_freq, scaling = rotary_frequencies(16, params["rope_theta"], params)
    out = apply_rotary(tm.tensor(q), positions, inv_freq, scaling)
    assert out.dtype == np.float32
    np.testing.assert_allclose(host(out), expected.numpy(), rtol=1e-5, atol=2e-5)


def test_interleaved_layout_matches_deepseek_after_deinterleaving():
    """transformers' DeepSeek-V3 (rope_interleave=True) rotates pairs (2i, 2i+1) and returns them de-interleaved
    (evens then odds); tinymoe keeps pairs in place. Same features, permuted alike in q and k, so q·k agrees."""
    torch = pytest.importorskip("torch")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 4, 5, 8)), rng.standard_normal((2, 1, 5, 8))
    positions = np.arange(3, 8)
    inv_freq, scaling = rotary_frequencies(8, 10000.0, ROPE_CASES["yarn_deepseek"])
    cos, sin = _torch_cos_sin(inv_freq, positions, scaling)
    expected_q, expected_k = apply_rotary_pos_emb_interleave(torch.as_tensor(q), torch.as_tensor(k), cos, sin)
    ours_q = host(apply_rotary(tm.tensor(q, dtype="float64"), positions, inv_freq, scaling, layout="interleaved"))
    ours_k = host(apply_rotary(tm.tensor(k, dtype="float64"), positions, inv_freq, scaling, layout="interleaved"))
    deinterleave = np.r_[0:8:2, 1:8:2]
    np.testing.assert_allclose(ours_q[..., deinterleave], expected_q.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours_k[..., deinterleave], expected_k.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours_q @ ours_k.swapaxes(-1, -2), (expected_q @ expected_k.transpose(-1, -2)).numpy(),
                               rtol=1e-11, atol=1e-11)


def test_partial_rotary_turns_the_first_features_and_passes_the_rest():
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 6, 10))
    inv_freq, _ = rotary_frequencies(4, 10000.0)
    out = host(apply_rotary(tm.tensor(x, dtype="float64"), np.arange(6), inv_freq, rotary_dim=4))
    cos, sin = _torch_cos_sin(inv_freq, np.arange(6), 1.0)
    expected, _ = apply_rotary_pos_emb(torch.as_tensor(x[..., :4]), torch.as_tensor(x[..., :4]), cos, sin)
    np.testing.assert_allclose(out[..., :4], expected.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_scores_depend_only_on_relative_position(layout):
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((1, 1, 1, 12)), rng.standard_normal((1, 1, 1, 12))
    inv_freq, _ = rotary_frequencies(12, 10000.0)

    def score(query_position, key_position):
        rq = host(apply_rotary(tm.tensor(q, dtype="float64"), [query_position], inv_freq, layout=layout))
        rk = host(apply_rotary(tm.tensor(k, dtype="float64"), [key_position], inv_freq, layout=layout))
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-10)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), rel=1e-12)
    assert abs(score(7, 3) - score(7, 4)) > 1e-3
    rotated = host(apply_rotary(tm.tensor(q, dtype="float64"), [9], inv_freq, layout=layout))
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(q), rel=1e-12)  # a rotation


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [6, 4])
def test_gradients_check(device, layout, rotary_dim):
    rng = np.random.default_rng(5)
    x = leaf(rng.standard_normal((2, 2, 3, 6)), device)
    inv_freq, _ = rotary_frequencies(rotary_dim, 100.0)
    positions = np.array([[0, 5, 9], [2, 3, 40]])
    assert tm.gradcheck(lambda x: apply_rotary(x, positions, inv_freq, 1.25, layout, rotary_dim), [x],
                        exact_max_elements=72)


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic' is not implemented"),
    ({"rope_type": "linear"}, r"needs scaling keys \['factor'\]"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, r"\['low_freq_factor'\] are not used"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "rotary_dim = int"),
    ({"rope_type": "linear", "factor": -2.0}, "must be positive"),
    ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64}, "needs max_positions"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, "high_freq_factor"),
])
def test_frequency_errors_name_the_problem(scaling, match):
    with pytest.raises(ValueError, match=match):
        rotary_frequencies(8, 10000.0, scaling)


def test_apply_errors_name_the_argument():
    x = tm.tensor(np.zeros((1, 2, 3, 8)), dtype="float64")
    inv_freq, _ = rotary_frequencies(8, 10000.0)
    with pytest.raises(ValueError, match="rotary_dim=7 must be even"):
        rotary_frequencies(7, 10000.0)
    with pytest.raises(ValueError, match=r"positions has shape \(4,\)"):
        apply_rotary(x, np.arange(4), inv_freq)
    with pytest.raises(ValueError, match="layout='pairs'"):
        apply_rotary(x, np.arange(3), inv_freq, layout="pairs")
    with pytest.raises(ValueError, match=r"rotary_dim=6 must be 2·len\(inv_freq\) = 8"):
        apply_rotary(x, np.arange(3), inv_freq, rotary_dim=6)
    with pytest.raises(ValueError, match="must have 4 dimension"):
        apply_rotary(tm.tensor(np.zeros((3, 8))), np.arange(3), inv_freq)
    with pytest.raises(TypeError, match="positions must hold integers"):
        apply_rotary(x, np.arange(3.0), inv_freq)
