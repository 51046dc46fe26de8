"""MoE.from_dense (sparse upcycling, Komatsuzaki et al. 2022): every expert a copy of the dense block, and at
step 0 the layer computes the dense block's output (oracle: the block's formula in plain NumPy), for every
router option that keeps the combine weights summing to 1; the others refused; noise; float64 gradcheck."""
import numpy as np
import pytest

import tinymoe as tm
from moe_helpers import inputs, set_parameter
from tinymoe.nn import Experts, MoE, MoEConfig, SwiGLU

D_MODEL, D_FF, N_TOKENS = 6, 10, 12
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}


def dense_block(dtype="float64", seed=0):
    return SwiGLU(D_MODEL, D_FF, dtype=dtype, generator=seed)


def swiglu_oracle(block, x):
    """y = w2 (silu(w1 x) ⊙ w3 x), by the formula, in float64."""
    w1, w3, w2 = (np.asarray(p.numpy(), np.float64) for p in (block.w1, block.w3, block.w2))
    a, b = x @ w1.T, x @ w3.T
    return (a / (1 + np.exp(-a)) * b) @ w2.T


def assert_close(actual, expected, dtype):
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


EXACT_OPTIONS = [
    dict(top_k=1),
    dict(top_k=2),
    dict(top_k=4),                                     # k = E: the dense mixture
    dict(top_k=2, router="sigmoid"),
    dict(top_k=2, router="noisy"),
    dict(top_k=2, router_bias=True, jitter=0.3),
    dict(top_k=2, n_groups=2, topk_groups=1),
    dict(top_k=2, balance="sequence"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("options", EXACT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_upcycled_layer_computes_the_dense_block(dtype, options):
    block = dense_block(dtype)
    options = dict(options)
    top_k = options.pop("top_k")
    moe = MoE.from_dense(block, 4, top_k, generator=3, **options).train()  # training: noise and jitter on
    x = np.random.default_rng(1).standard_normal((3, N_TOKENS // 3, D_MODEL))
    out = moe(tm.tensor(x, dtype=dtype)).numpy()
    assert out.dtype == np.dtype(dtype) and out.shape == x.shape
    assert len(set(moe.stats.tokens_per_expert.tolist())) > 1 or top_k == 4  # tokens really spread out
    assert_close(out, swiglu_oracle(block, x), dtype)
    assert_close(out, block(tm.tensor(x, dtype=dtype)).numpy(), dtype)


def test_every_expert_is_a_copy_and_the_config_comes_from_the_block():
    block = dense_block()
    moe = MoE.from_dense(block, 3, 2, name="up")
    assert (moe.config.d_model, moe.config.d_ff, moe.config.activation, moe.config.dtype) == (6, 10, "swiglu", "float64")
    assert moe.name == "up" and moe.experts.w1.shape == (3, D_FF, D_MODEL)
    for expert in range(3):
        for name in ("w1", "w3", "w2"):
            assert np.array_equal(getattr(moe.experts, name).numpy()[expert], getattr(block, name).numpy())
    block.w1.data[0, 0] += 1.0  # a copy, not a view of the dense block
    assert not np.array_equal(moe.experts.w1.numpy()[0], block.w1.numpy())


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_upcycles_a_one_expert_mlp_with_biases(activation):
    block = Experts(MoEConfig(d_model=D_MODEL, d_ff=D_FF, n_experts=1, top_k=1, activation=activation,
                              dtype="float64"), generator=0)
    moe = MoE.from_dense(block, 4, 2, generator=1)
    assert moe.config.activation == activation and {"b1", "b2"} <= {n for n, _ in moe.experts.named_parameters()}
    x = np.random.default_rng(2).standard_normal((N_TOKENS, D_MODEL))
    w1, b1, w2, b2 = (p.numpy()[0] for p in (block.w1, block.b1, block.w2, block.b2))
    hidden = x @ w1.T + b1
    hidden = np.maximum(hidden, 0) if activation == "relu" else hidden / (1 + np.exp(-hidden))
    assert_close(moe(tm.tensor(x, dtype="float64")).numpy(), hidden @ w2.T + b2, "float64")


def test_upcycles_gated_experts_with_bias_and_clamp():
    config = MoEConfig(d_model=D_MODEL, d_ff=D_FF, n_experts=1, top_k=1, activation="swiglu_clamped",
                       expert_bias=True, swiglu_limit=0.5, dtype="float64")
    block = Experts(config, generator=0)
    moe = MoE.from_dense(block, 4, 2, generator=1)
    assert (moe.config.expert_bias, moe.config.swiglu_limit) == (True, 0.5)
    x = tm.tensor(np.random.default_rng(2).standard_normal((N_TOKENS, D_MODEL)), dtype="float64")
    assert_close(moe(x).numpy(), block(x, (0, N_TOKENS)).numpy(), "float64")


@pytest.mark.parametrize("options, message", [
    (dict(normalize_top_k=False), "normalize_top_k=False"),
    (dict(capacity_factor=1.0), "capacity_factor=1.0"),
    (dict(n_shared_experts=1), "n_shared_experts=1"),
    (dict(n_null_experts=2), "n_null_experts=2"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor=2.0"),
    (dict(router="top_p", top_p=0.5), "router='top_p'"),
    (dict(router="relu"), "router='relu'"),
    (dict(router="expert_choice"), "router='expert_choice'"),
])
def test_options_that_break_the_equality_are_refused_unless_exact_false(options, message):
    block = dense_block()
    with pytest.raises(ValueError, match=f"would not compute the dense block.*{message}.*exact=False"):
        MoE.from_dense(block, 4, 2, **options)
    moe = MoE.from_dense(block, 4, 2, exact=False, generator=5, **options)
    x = np.random.default_rng(1).standard_normal((N_TOKENS, D_MODEL))
    out = moe(tm.tensor(x, dtype="float64")).numpy()
    assert np.abs(out - swiglu_oracle(block, x)).max() > 1e-6  # the documented difference is real


def test_bad_arguments_raise_early():
    block = dense_block()
    with pytest.raises(TypeError, match="must be a tinymoe.nn.SwiGLU or an Experts with n_experts=1"):
        MoE.from_dense(tm.nn.Linear(4, 4), 4, 2)
    with pytest.raises(TypeError, match=r"\['d_ff'\] come from the dense block"):
        MoE.from_dense(block, 4, 2, d_ff=8)
    with pytest.raises(ValueError, match="top_k=5 must be at most n_experts=4"):
        MoE.from_dense(block, 4, 5)
    with pytest.raises(ValueError, match="noise"):
        MoE.from_dense(block, 4, 2, noise=-0.1)
    with pytest.raises(TypeError, match="exact"):
        MoE.from_dense(block, 4, 2, capacity_factor=1.0, exact="no")


def test_noise_breaks_symmetry_by_the_relative_std_and_is_seeded():
    block = SwiGLU(32, 64, dtype="float64", generator=0)
    moe = MoE.from_dense(block, 4, 2, noise=0.05, generator=7)
    again = MoE.from_dense(block, 4, 2, noise=0.05, generator=7)
    for name in ("w1", "w3", "w2"):
        dense, copies = getattr(block, name).numpy(), getattr(moe.experts, name).numpy()
        assert np.array_equal(copies, getattr(again.experts, name).numpy())
        relative = (copies - dense[None]).std(axis=(1, 2)) / dense.std()
        np.testing.assert_allclose(relative, 0.05, rtol=0.1)  # 2048 draws per expert: ±3% of the std
        assert not np.allclose(copies[0], copies[1])
    x = np.random.default_rng(1).standard_normal((N_TOKENS, 32))
    assert np.abs(moe(tm.tensor(x, dtype="float64")).numpy() - swiglu_oracle(block, x)).max() > 1e-4


def test_router_gets_no_gradient_from_the_output_while_experts_are_identical():
    moe = MoE.from_dense(dense_block(), 4, 2, generator=3)
    x = inputs((N_TOKENS, D_MODEL), requires_grad=False)
    cotangent = tm.tensor(np.random.default_rng(4).standard_normal((N_TOKENS, D_MODEL)), dtype="float64")
    (moe(x) * cotangent).sum().backward()
    assert np.abs(moe.router.weight.grad).max() < 1e-12
    assert np.abs(moe.experts.w1.grad).max() > 1e-3


@pytest.mark.parametrize("noise", [0.0, 0.3], ids=["identical-experts", "noisy-copies"])
def test_upcycled_layer_gradcheck(noise):
    block = dense_block()
    for name in ("w1", "w3", "w2"):  # O(1) weights: every path carries a visible gradient
        set_parameter(getattr(block, name), 0.6 * np.random.default_rng(9).standard_normal(getattr(block, name).shape))
    moe = MoE.from_dense(block, 4, 2, noise=noise, generator=3)
    set_parameter(moe.router.weight, 1.5 * np.random.default_rng(8).standard_normal(moe.router.weight.shape))
    x = inputs((N_TOKENS, D_MODEL))
    assert tm.gradcheck(lambda *_: moe(x), [x, *moe.parameters()])
