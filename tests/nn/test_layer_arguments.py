"""Bad layer arguments raise early errors naming the argument and value: the router's update_bias rate, bool
flags of every layer, sizes whose parameters cannot fit in memory (before anything is allocated); and a
capacity factor beyond what any expert can be asked for acts as dropless, exactly."""
import math
import re

import numpy as np
import pytest

import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.nn import Dropout, Embedding, Experts, LayerNorm, Linear, MoE, MoEConfig, RMSNorm, Router, SwiGLU
from tinymoe.nn import init


# ----- Router.update_bias(rate) ----------------------------------------------------------------------------------
BAD_RATES = [
    (math.inf, ValueError), (-math.inf, ValueError), (math.nan, ValueError), (0.0, ValueError), (-0.1, ValueError),
    ("0.1", TypeError), (True, TypeError), (None, ValueError), ([0.1], TypeError),
]


@pytest.mark.parametrize("rate, error", BAD_RATES, ids=[repr(rate) for rate, _ in BAD_RATES])
def test_update_bias_rate_is_checked_like_the_constructor(rate, error):
    moe = layer(router="sigmoid")
    moe.train()(inputs((8, 6)))
    before = host(moe.router.bias).copy()
    with pytest.raises(error, match="rate" if rate is None else re.escape(f"rate={rate!r}")):
        moe.update_bias(rate)
    np.testing.assert_array_equal(host(moe.router.bias), before)  # nothing moved


def test_update_bias_accepts_numpy_scalars_and_moves_by_the_rate():
    moe = layer(router="sigmoid")
    moe.train()(inputs((8, 6)))
    load = moe.router.last_load.astype(np.float64)
    moe.update_bias(np.float32(0.25))
    np.testing.assert_allclose(host(moe.router.bias), 0.25 * np.sign(load.mean() - load))


# ----- bool flags ------------------------------------------------------------------------------------------------
NOT_BOOLS = ["yes", 1, 0, None, 1.0]


@pytest.mark.parametrize("value", NOT_BOOLS)
@pytest.mark.parametrize("where, call", [
    ("Linear: bias", lambda v: Linear(3, 2, bias=v)),
    ("MoE.train: mode", lambda v: layer().train(v)),
    ("Linear.train: mode", lambda v: Linear(3, 2).train(v)),
    ("load_state_dict: strict", lambda v: Linear(3, 2).load_state_dict(Linear(3, 2).state_dict(), strict=v)),
    ("MoEConfig: normalize_top_k", lambda v: MoEConfig(d_model=4, d_ff=4, n_experts=2, normalize_top_k=v)),
], ids=["Linear.bias", "MoE.train", "Linear.train", "load_state_dict.strict", "normalize_top_k"])
def test_flags_must_be_bools(where, call, value):
    with pytest.raises(TypeError, match=re.escape(f"{where}={value!r} must be")):
        call(value)


def test_numpy_bools_are_flags_too():
    assert Linear(3, 2, bias=np.bool_(False)).bias is None
    assert layer().train(np.bool_(False)).training is False


BAD_NUMBERS = [
    (lambda v: Dropout(v), "Dropout: p", [1.5, -0.1, math.nan, "0.1", True]),
    (lambda v: RMSNorm(4, eps=v), "RMSNorm: eps", [-1e-6, math.nan, "1e-6", True]),
    (lambda v: LayerNorm(4, eps=v), "LayerNorm: eps", [-1e-6, math.inf, None]),
    (lambda v: Embedding(4, 3, std=v), "Embedding: std", [-1.0, math.nan, "1"]),
]


@pytest.mark.parametrize("call, where, value", [(c, w, v) for c, w, vs in BAD_NUMBERS for v in vs],
                         ids=[f"{w}={v!r}" for _, w, vs in BAD_NUMBERS for v in vs])
def test_numbers_of_basic_layers_name_the_argument(call, where, value):
    with pytest.raises((TypeError, ValueError), match=re.escape(f"{where}={value!r}")):
        call(value)


# ----- sizes too big for memory ------------------------------------------------------------------------------
HUGE = 10 ** 13
TOO_BIG = [
    ("Experts", "d_ff", lambda: MoE(d_model=64, d_ff=HUGE, n_experts=8), 3 * 8 * HUGE * 64 * 4 + 8 * 8 * HUGE * 64),
    ("SwiGLU", "d_ff", lambda: SwiGLU(64, HUGE), None),
    ("Router", "n_experts", lambda: Router(MoEConfig(d_model=64, d_ff=4, n_experts=HUGE, top_k=1)), None),
    ("Embedding", "num_embeddings", lambda: Embedding(HUGE, 64), None),
    ("Linear", "out_features", lambda: Linear(64, HUGE), None),
    ("RMSNorm", "dim", lambda: RMSNorm(HUGE), None),
]


@pytest.mark.parametrize("op, argument, build, expected_bytes", TOO_BIG, ids=[t[0] for t in TOO_BIG])
def test_parameters_larger_than_memory_are_refused_naming_the_argument(op, argument, build, expected_bytes):
    if init.available_memory() is None:
        pytest.skip("available memory is unknown on this platform (the check is skipped there)")
    with pytest.raises(MemoryError, match=rf"^{op}: .*{argument}={HUGE}.*reduce {argument}={HUGE}") as caught:
        build()
    assert "bytes available (MemAvailable)" in str(caught.value)
    if expected_bytes is not None:  # w1, w3 and w2 in float32, plus one of them drawn in float64
        assert f"ask for {expected_bytes:.3g} bytes" in str(caught.value)


def test_the_memory_check_compares_with_what_is_available(monkeypatch):
    # Experts (E=2, ff=1000, d=100, swiglu, float32): 3 · 200,000 · 4 = 2.4 MB + 200,000 · 8 = 1.6 MB drawn.
    config = MoEConfig(d_model=100, d_ff=1000, n_experts=2, top_k=1)
    monkeypatch.setattr(init, "available_memory", lambda: 4_000_000)
    Experts(config)  # exactly enough
    monkeypatch.setattr(init, "available_memory", lambda: 3_999_999)
    with pytest.raises(MemoryError, match=r"Experts: d_ff=1000, d_model=100, n_experts=2 ask for 4e\+06 bytes"):
        Experts(config)
    monkeypatch.setattr(init, "available_memory", lambda: None)
    Experts(config)  # unknown: no check


def test_available_memory_reads_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    1234 kB\n")
    monkeypatch.setattr(init, "MEMINFO", str(meminfo))
    monkeypatch.setattr(init.sys, "platform", "linux")
    assert init.available_memory() == 1234 * 1024
    monkeypatch.setattr(init, "MEMINFO", str(tmp_path / "missing"))
    assert init.available_memory() is None


# ----- capacity beyond T acts as dropless ----------------------------------------------------------------------
@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid"])
@pytest.mark.parametrize("factor", [1e20, 1e300, 4.0])
def test_a_huge_capacity_factor_equals_dropless_exactly(router, factor, device):
    """factor · T · k / E ≥ T for these (T=12, k=2, E=4: 4.0 gives exactly 24/... ≥ T): no expert can be asked for
    more than T rows, so outputs and every gradient must equal the dropless layer's bit for bit."""
    x_values = inputs((12, 6), device=device)
    results = []
    for capacity_factor in (factor, None):
        moe = layer(router=router, capacity_factor=capacity_factor, device=device).eval()
        x = tm.tensor(host(x_values), requires_grad=True, device=device, dtype="float64")
        with fast_kernels(device):
            out = moe(x)
            (out * tm.tensor(np.linspace(-1, 1, out.size).reshape(out.shape), device=device)).sum().backward()
        assert moe.stats.dropped_fraction == 0.0
        results.append([host(out), host(x.grad)] + [host(p.grad) for p in moe.parameters()])
    for huge, dropless in zip(*results):
        np.testing.assert_array_equal(huge, dropless)


@pytest.mark.parametrize("factor, tokens, expected", [(1e20, 12, 12), (1e300, 5, 5), (1.0, 12, 6), (0.01, 12, 1)])
def test_capacity_is_at_most_the_number_of_tokens(factor, tokens, expected):
    # token choice: ceil(factor · T · k / E) with k=2, E=4, clamped to T
    router = layer(capacity_factor=factor).router
    assert router.capacity(tokens) == expected
    # expert choice: ceil(factor · T / E), at least 1, clamped to T
    choice = layer(router="expert_choice", capacity_factor=factor).router
    assert choice.capacity(tokens) == min(tokens, max(1, math.ceil(factor * tokens / 4)))
