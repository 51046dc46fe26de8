"""Determinism of the MoE layer (same seed, same bits; repeated forwards; reseed) and every kernel implementation
agreeing with the NumPy reference, for fixed cases and any routing."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.nn import MoE

ROUTERS = ["softmax", "noisy", "sigmoid", "expert_choice"]


# ----- determinism and kernels ---------------------------------------------------------------------------------
DETERMINISM = [
    dict(router="softmax", capacity_factor=0.75, n_shared_experts=1),
    dict(router="noisy", jitter=0.3),
    dict(router="sigmoid", activation="gelu"),
    dict(router="expert_choice", capacity_factor=1.5),
]


@pytest.mark.parametrize("options", DETERMINISM, ids=[o["router"] for o in DETERMINISM])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_same_seed_gives_bit_identical_layers_outputs_and_gradients(device, options, training):
    def run(seed):
        moe = MoE(6, 5, 4, top_k=2, dtype="float64", device=device, seed=seed, **options).train(training)
        x = inputs((12, 6), device=device)
        with fast_kernels(device):
            y = moe(x)
            y.backward(y.xp.asarray(np.random.default_rng(0).standard_normal(y.shape)))
        return moe, host(y), host(x.grad), [host(p.grad) for p in moe.parameters()]

    first, second, other = run(11), run(11), run(12)
    for (name, a), (_, b) in zip(first[0].named_parameters(), second[0].named_parameters()):
        np.testing.assert_array_equal(host(a), host(b), err_msg=name)
    for a, b in zip(first[1:3], second[1:3]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first[3], second[3]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])  # and the seed matters


def test_repeated_forwards_are_bit_identical_and_reseed_repeats_noise(device):
    moe = layer(router="noisy", jitter=0.2, capacity_factor=1.0, device=device)
    x = inputs((12, 6), device=device)
    with fast_kernels(device):
        eval_outputs = [host(moe.eval()(x)) for _ in range(2)]
        moe.train()
        moe.reseed(5)
        first = host(moe(x))
        moe.reseed(5)
        again = host(moe(x))
        moe.reseed(6)
        other = host(moe(x))
    np.testing.assert_array_equal(eval_outputs[0], eval_outputs[1])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


KERNEL_CASES = [
    dict(router="softmax", capacity_factor=0.75, n_shared_experts=1, n_tokens=12),
    dict(router="softmax", top_k=3, n_tokens=257),
    dict(router="sigmoid", activation="gelu", capacity_factor=1.25, n_tokens=40),
    dict(router="expert_choice", capacity_factor=1.0, n_tokens=33),
    dict(router="noisy", top_k=1, n_tokens=20),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: f"{case['router']}-T{case['n_tokens']}")
def test_every_kernel_implementation_matches_the_numpy_reference(device, case):
    options = dict(case)
    n_tokens = options.pop("n_tokens")
    moe = layer(device=device, **{"top_k": 2, **options})
    cotangent = np.random.default_rng(4).standard_normal((n_tokens, 6))
    results = {}
    names = ["auto", *tm.kernels.available(device)]
    for name in names:
        x = inputs((n_tokens, 6), device=device)
        moe.zero_grad()
        with tm.kernels.use(name):
            moe.reseed(0)  # the layer trains by default: the same noise for every implementation
            y = moe(x)
            y.backward(y.xp.asarray(cotangent))
        results[name] = (host(y), host(x.grad), [host(p.grad) for p in moe.parameters()], moe.stats.as_dict())
    expected = results["numpy"]
    for name in names:
        np.testing.assert_allclose(results[name][0], expected[0], rtol=1e-12, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(results[name][1], expected[1], rtol=1e-12, atol=1e-13, err_msg=name)
        for got, want in zip(results[name][2], expected[2]):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12, err_msg=name)
        stats, expected_stats = results[name][3], expected[3]
        for key in ("tokens_per_expert", "requested_per_expert"):
            assert stats[key] == expected_stats[key], (name, key)
        for key in ("dropped_fraction", "router_entropy", "mean_top1_probability"):
            assert stats[key] == pytest.approx(expected_stats[key], rel=1e-12), (name, key)
    assert device != "cpu" or not tm.numba_available() or "numba" in names


@st.composite
def routing_cases(draw):
    router = draw(st.sampled_from(ROUTERS))
    n_experts = draw(st.integers(2 if router == "noisy" else 1, 6))
    top_k = draw(st.integers(1, n_experts - 1 if router == "noisy" else n_experts))
    return dict(router=router, n_experts=n_experts, top_k=top_k, n_tokens=draw(st.integers(1, 40)),
                capacity_factor=draw(st.sampled_from([None, 0.5, 1.0, 1.5])) if router != "expert_choice"
                else draw(st.sampled_from([0.5, 1.0])),
                dtype=draw(st.sampled_from(["float64", "float32"])), seed=draw(st.integers(0, 2**16)))


@given(case=routing_cases())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_implementations_agree_for_any_routing(device, case):
    moe = layer(d_model=4, d_ff=3, n_experts=case["n_experts"], top_k=case["top_k"], router=case["router"],
                capacity_factor=case["capacity_factor"], dtype=case["dtype"], device=device, seed=case["seed"]).eval()
    tolerance = dict(rtol=1e-12, atol=1e-13) if case["dtype"] == "float64" else dict(rtol=1e-5, atol=1e-6)
    results = []
    for name in tm.kernels.available(device):
        x = inputs((case["n_tokens"], 4), seed=case["seed"], dtype=case["dtype"], device=device)
        moe.zero_grad()
        with tm.kernels.use(name):
            y = moe(x)
            y.backward(y.xp.ones(y.shape, dtype=y.dtype))
        results.append((host(y), host(x.grad), *[host(p.grad) for p in moe.parameters()], moe.stats.tokens_per_expert))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_allclose(got, want, **tolerance)
