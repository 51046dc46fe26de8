"""Every registered kernel implementation against the reference, primitive by primitive.

Cases come from Hypothesis: T, d, K ≤ E, E, empty experts, every token on one expert, capacity drops (down to
capacity 0), valid masks, T = 1. float32/float64 everywhere, float16 on CUDA (compared with the float64
reference of the same inputs, since the kernels accumulate float16 in float32).
"""
import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymoe import kernels
from tinymoe.engine.backend import module_for_device, to_numpy
from tinymoe.kernels import reference

CASES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PLAN_FIELDS = ("requested_per_expert", "expert_offsets", "row_token", "row_assignment", "assignment_row")


def dtypes_for(device):
    return ("float32", "float64", "float16") if device == "cuda" else ("float32", "float64")


def tolerance(dtype):
    return {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=2e-5, atol=2e-5),
            "float16": dict(rtol=1e-2, atol=2e-2)}[np.dtype(dtype).name]


def fast_implementations(device):
    """The implementations other than the reference that run on `device` here (maybe none)."""
    return [kernels.implementation(module_for_device(device).zeros(1), name)
            for name in kernels.available(device) if name != "numpy"]


@st.composite
def routings(draw):
    """(T, K) expert choices with E experts, in one of a few shapes of imbalance, plus capacity and valid mask."""
    n_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, min(n_experts, 4)))
    n_tokens = draw(st.sampled_from([1, 2, 3, draw(st.integers(1, 40))]))
    seed = draw(st.integers(0, 2**31))
    layout = draw(st.sampled_from(["uniform", "one expert", "some experts empty"]))
    rng = np.random.default_rng(seed)
    if layout == "one expert":
        expert_ids = np.full((n_tokens, top_k), draw(st.integers(0, n_experts - 1)))
    else:
        n_used = n_experts if layout == "uniform" else max(1, n_experts // 2)
        pool = rng.choice(n_experts, n_used, replace=False)
        expert_ids = rng.choice(pool, (n_tokens, top_k))
    capacity = draw(st.one_of(st.none(), st.just(0), st.integers(1, n_tokens * top_k)))
    valid = draw(st.one_of(st.none(), st.just("mask")))
    valid = None if valid is None else rng.random((n_tokens, top_k)) < 0.7
    return expert_ids, n_experts, capacity, valid, seed


def to_device(device, *arrays):
    xp = module_for_device(device)
    return [None if array is None else xp.asarray(array) for array in arrays]


def random_rows(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def check(actual, expected_inputs, primitive, dtype, *args):
    """Compare `actual` with the reference run on the same inputs (in float64 for float16 data)."""
    if np.dtype(dtype) == np.float16:
        args = tuple(a.astype(np.float64) if getattr(a, "dtype", None) == np.float16 else a for a in expected_inputs)
    else:
        args = expected_inputs
    expected = getattr(reference, primitive)(*args)
    actual, expected = (actual, expected) if isinstance(actual, tuple) else ((actual,), (expected,))
    for got, want in zip(actual, expected):
        assert got.dtype == np.dtype(dtype), f"{primitive} returned {got.dtype}, expected {dtype}"
        assert got.shape == want.shape
        np.testing.assert_allclose(to_numpy(got).astype(np.float64), to_numpy(want).astype(np.float64),
                                   err_msg=primitive, **tolerance(dtype))


@CASES
@given(case=routings())
def test_routing_plan_matches_reference(device, case):
    expert_ids, n_experts, capacity, valid, _ = case
    ids, valid_mask = to_device(device, expert_ids, valid)
    expected = reference.routing_plan(ids, n_experts, capacity, valid_mask)
    for implementation in fast_implementations(device):
        plan = implementation.routing_plan(ids, n_experts, capacity, valid_mask)
        for field in PLAN_FIELDS:
            got, want = to_numpy(getattr(plan, field)), to_numpy(getattr(expected, field))
            assert got.dtype == np.int64 and got.shape == want.shape, field
            np.testing.assert_array_equal(got, want, err_msg=field)
        np.testing.assert_array_equal(plan.expert_offsets_host, expected.expert_offsets_host)
        assert (plan.n_rows, plan.n_requested, plan.capacity) == (expected.n_rows, expected.n_requested, capacity)
        assert (plan.n_tokens, plan.top_k, plan.n_experts) == (expected.n_tokens, expected.top_k, n_experts)


@CASES
@given(case=routings(), d_model=st.integers(1, 24), data=st.data())
def test_gather_and_combine_match_reference(device, case, d_model, data):
    expert_ids, n_experts, capacity, valid, seed = case
    dtype = data.draw(st.sampled_from(dtypes_for(device)), label="dtype")
    rng = np.random.default_rng(seed)
    n_tokens, top_k = expert_ids.shape
    plan = reference.routing_plan(expert_ids, n_experts, capacity, valid)
    x, y = random_rows(rng, (n_tokens, d_model), dtype), random_rows(rng, (plan.n_rows, d_model), dtype)
    grad_out = random_rows(rng, (n_tokens, d_model), dtype)
    scale, weights = rng.random(plan.n_rows).astype(dtype), rng.random((n_tokens, top_k)).astype(dtype)
    host = dict(x=x, y=y, grad_out=grad_out, scale=scale, weights=weights, row_token=plan.row_token,
                assignment_row=plan.assignment_row)
    dev = dict(zip(host, to_device(device, *host.values())))
    for implementation in fast_implementations(device):
        for s in (None, "scale"):
            check(implementation.gather_rows(dev["x"], dev["row_token"], s and dev["scale"]),
                  (x, plan.row_token, s and scale), "gather_rows", dtype)
        for w in (None, "weights"):
            check(implementation.combine_rows(dev["y"], dev["assignment_row"], w and dev["weights"]),
                  (y, plan.assignment_row, w and weights), "combine_rows", dtype)
        check(implementation.combine_weights_grad(dev["grad_out"], dev["y"], dev["assignment_row"]),
              (grad_out, y, plan.assignment_row), "combine_weights_grad", dtype)


@CASES
@given(n_values=st.integers(0, 60), n_rows=st.integers(1, 30), d_model=st.integers(1, 20),
       layout=st.sampled_from(["random", "one row", "sorted"]), seed=st.integers(0, 2**31), data=st.data())
def test_scatter_add_rows_matches_reference(device, n_values, n_rows, d_model, layout, seed, data):
    dtype = data.draw(st.sampled_from(dtypes_for(device)), label="dtype")
    rng = np.random.default_rng(seed)
    index = {"random": rng.integers(0, n_rows, n_values), "one row": np.full(n_values, n_rows - 1),
             "sorted": np.sort(rng.integers(0, n_rows, n_values))}[layout]
    values = random_rows(rng, (n_values, d_model), dtype)
    values_dev, index_dev = to_device(device, values, index)
    for implementation in fast_implementations(device):
        check(implementation.scatter_add_rows(values_dev, index_dev, n_rows), (values, index, n_rows),
              "scatter_add_rows", dtype)


@CASES
@given(shape=st.sampled_from([(1, 1), (3, 7), (16, 8), (5, 33), (2, 3, 4), (9,)]), spread=st.sampled_from([1.0, 12.0]),
       seed=st.integers(0, 2**31), data=st.data())
def test_swiglu_matches_reference(device, shape, spread, seed, data):
    dtype = data.draw(st.sampled_from(dtypes_for(device)), label="dtype")
    rng = np.random.default_rng(seed)
    a = (spread * rng.standard_normal(shape)).astype(dtype)  # spread 12 reaches where σ saturates
    b, grad_h = random_rows(rng, shape, dtype), random_rows(rng, shape, dtype)
    a_dev, b_dev, grad_dev = to_device(device, a, b, grad_h)
    for implementation in fast_implementations(device):
        check(implementation.swiglu(a_dev, b_dev), (a, b), "swiglu", dtype)
        check(implementation.swiglu_backward(a_dev, b_dev, grad_dev), (a, b, grad_h), "swiglu_backward", dtype)


def test_float32_swiglu_is_accurate_across_the_whole_range(device):
    """Against float64 math for a in [−120, 120] and the edge values: errors of a few float32 ulps, no NaN or inf
    (the Numba kernel computes exp with its own vectorised series, the CUDA one with expf)."""
    gates = np.concatenate([np.linspace(-120, 120, 24001), [0.0, -0.0, 1e-30, -1e-30, 87.0, -87.5, 88.7, -88.7]])
    a = gates.astype(np.float32).reshape(-1, 1)
    ups = np.linspace(-3, 3, a.size).astype(np.float32).reshape(-1, 1)
    exact_a, exact_b = a.astype(np.float64), ups.astype(np.float64)
    sigma = 1 / (1 + np.exp(-exact_a))
    silu = exact_a * sigma
    expected = {"h": silu * exact_b, "grad_a": exact_b * sigma * (1 + exact_a * (1 - sigma)), "grad_b": silu}
    a_dev, b_dev, grad_dev = to_device(device, a, ups, np.ones_like(a))
    for implementation in fast_implementations(device):
        grad_a, grad_b, h = (to_numpy(x) for x in implementation.swiglu_backward(a_dev, b_dev, grad_dev))
        results = {"h": to_numpy(implementation.swiglu(a_dev, b_dev)), "grad_a": grad_a, "grad_b": grad_b}
        np.testing.assert_array_equal(h, results["h"])
        for name, result in results.items():
            assert np.isfinite(result).all(), name
            error = np.abs(result - expected[name]) / np.maximum(np.abs(expected[name]), 1.0)  # grad_a crosses 0
            assert error.max() < 1e-6, (name, float(a[np.argmax(error), 0]), float(error.max()))


def test_kernels_are_deterministic(device):
    """Two runs on the same inputs give the same bits (owner-computes, fixed summation order)."""
    rng = np.random.default_rng(0)
    expert_ids = rng.integers(0, 4, (257, 2))
    plan = reference.routing_plan(expert_ids, 4)
    y = random_rows(rng, (plan.n_rows, 96), "float32")
    grad_out = random_rows(rng, (257, 96), "float32")
    y_dev, grad_dev, index_dev, rows_dev = to_device(device, y, grad_out, plan.assignment_row, plan.row_token)
    for implementation in fast_implementations(device):
        calls = [lambda: implementation.combine_rows(y_dev, index_dev),
                 lambda: implementation.combine_weights_grad(grad_dev, y_dev, index_dev),
                 lambda: implementation.scatter_add_rows(y_dev, rows_dev, 257)]
        for call in calls:
            np.testing.assert_array_equal(to_numpy(call()), to_numpy(call()))


def test_nothing_kept_gives_zeros(device):
    """Capacity 0 drops every assignment: the combine and its weight gradient are exactly zero."""
    expert_ids = np.zeros((5, 2), dtype=np.int64)
    plan = reference.routing_plan(expert_ids, 3, capacity=0)
    assert plan.n_rows == 0 and (plan.assignment_row == -1).all()
    y, grad_out, index = to_device(device, np.zeros((0, 4)), np.ones((5, 4)), plan.assignment_row)
    for implementation in fast_implementations(device):
        assert not to_numpy(implementation.combine_rows(y, index)).any()
        assert not to_numpy(implementation.combine_weights_grad(grad_out, y, index)).any()
        assert implementation.gather_rows(grad_out, index[:0, 0]).shape == (0, 4)


def test_inputs_are_not_modified(device):
    rng = np.random.default_rng(1)
    x = random_rows(rng, (6, 5), "float64")
    index = np.array([[0, -1], [2, 1]])
    scale = rng.random(4)
    x_dev, index_dev, scale_dev = to_device(device, x, index, scale)
    for implementation in fast_implementations(device):
        implementation.gather_rows(x_dev, index_dev.reshape(-1).clip(0), scale_dev)
        implementation.combine_rows(x_dev, index_dev, x_dev[:2, :2])
        implementation.swiglu_backward(x_dev, x_dev, x_dev)
        np.testing.assert_array_equal(to_numpy(x_dev), x)
        np.testing.assert_array_equal(to_numpy(index_dev), index)


@pytest.mark.skipif(not kernels.is_available("numba", "cpu"), reason="needs numba")
def test_numba_refuses_indices_it_would_read_or_write_out_of_bounds():
    numba_cpu = kernels.implementation(np.zeros(1), "numba")
    x = np.ones((4, 3))
    calls = [lambda: numba_cpu.gather_rows(x, np.array([0, 4])),
             lambda: numba_cpu.gather_rows(x, np.array([-1, 0])),
             lambda: numba_cpu.combine_rows(x, np.array([[0, -2]])),
             lambda: numba_cpu.combine_weights_grad(x[:1], x, np.array([[4, -1]])),
             lambda: numba_cpu.scatter_add_rows(x, np.array([0, 1, 2, 5]), 5 - 1),
             lambda: numba_cpu.routing_plan(np.array([[0, 3]]), 3)]
    for call in calls:
        with pytest.raises(IndexError, match="outside"):
            call()


@pytest.mark.parametrize("name", ["numpy", "numba", "cupy"])
def test_implementations_expose_every_primitive(name):
    device = "cuda" if name == "cupy" else "cpu"
    if not kernels.is_available(name, device):
        pytest.skip(f"{name} is not available here")
    module = kernels.implementation(module_for_device(device).zeros(1), name)
    for primitive in kernels.PRIMITIVES:
        assert callable(getattr(module, primitive)), f"{name} lacks {primitive}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_swiglu_reads_the_halves_of_one_buffer_and_writes_into_out(device, dtype):
    """The experts' layout: a, b = the two halves of [a | b] (n, 2ff); out=(da, db) the halves of [da | db].
    Every implementation taking out= must fill it; the values match the reference on contiguous copies."""
    rng = np.random.default_rng(3)
    gate_up = (4 * rng.standard_normal((37, 2 * 19))).astype(dtype)
    grad_h = random_rows(rng, (37, 19), dtype)
    a, b = np.ascontiguousarray(gate_up[:, :19]), np.ascontiguousarray(gate_up[:, 19:])
    gate_up_dev, grad_dev = to_device(device, gate_up, grad_h)
    xp = module_for_device(device)
    for implementation in [reference] + fast_implementations(device):
        halves = gate_up_dev[:, :19], gate_up_dev[:, 19:]
        check(implementation.swiglu(*halves), (a, b), "swiglu", dtype)
        check(implementation.swiglu_backward(*halves, grad_dev), (a, b, grad_h), "swiglu_backward", dtype)
        if "out" not in inspect.signature(implementation.swiglu_backward).parameters:
            continue
        joint = xp.full((37, 2 * 19), np.nan, dtype=dtype)
        grad_a, grad_b, h = implementation.swiglu_backward(*halves, grad_dev, out=(joint[:, :19], joint[:, 19:]))
        expected_a, expected_b, expected_h = reference.swiglu_backward(a, b, grad_h)
        expected_joint = np.concatenate([expected_a, expected_b], axis=1)
        np.testing.assert_allclose(to_numpy(joint), expected_joint, **tolerance(dtype))
        np.testing.assert_array_equal(to_numpy(grad_a), to_numpy(joint[:, :19]))
        np.testing.assert_allclose(to_numpy(h), expected_h, **tolerance(dtype))
        np.testing.assert_array_equal(to_numpy(gate_up_dev), gate_up)  # inputs untouched


@pytest.mark.skipif(not kernels.is_available("numba", "cpu"), reason="needs numba")
def test_numba_swiglu_backward_refuses_an_out_it_cannot_fill():
    from tinymoe.kernels import numba_cpu
    a = np.ones((4, 3), np.float32)
    message = r"swiglu_backward: out db must be a 2-D float32 NumPy array of shape \(4, 3\)"
    with pytest.raises(ValueError, match=message):
        numba_cpu.swiglu_backward(a, a, a, out=(np.empty((4, 3), np.float32), np.empty((4, 2), np.float32)))
    with pytest.raises(ValueError, match="out da must be a 2-D float32"):
        numba_cpu.swiglu_backward(a, a, a, out=(np.empty((4, 3), np.float64), np.empty((4, 3), np.float32)))


@pytest.mark.skipif(not kernels.is_available("numba", "cpu"), reason="needs numba")
@pytest.mark.parametrize("n_rows, width", [(0, 3), (1, 1), (1, 4), (5, 1), (6, 9)])
def test_numba_swiglu_on_halves_of_every_small_shape(n_rows, width):
    from tinymoe.kernels import numba_cpu
    rng = np.random.default_rng(n_rows * 10 + width)
    gate_up, grad_h = rng.standard_normal((n_rows, 2 * width)), rng.standard_normal((n_rows, width))
    a, b = gate_up[:, :width], gate_up[:, width:]
    sigma = 1 / (1 + np.exp(-a))  # the formula, in float64
    joint = np.full_like(gate_up, np.nan)
    grad_a, grad_b, h = numba_cpu.swiglu_backward(a, b, grad_h, out=(joint[:, :width], joint[:, width:]))
    np.testing.assert_allclose(numba_cpu.swiglu(a, b), a * sigma * b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h, a * sigma * b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(joint[:, :width], grad_h * b * sigma * (1 + a * (1 - sigma)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(joint[:, width:], grad_h * a * sigma, rtol=1e-12, atol=1e-12)
