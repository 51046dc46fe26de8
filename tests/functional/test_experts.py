"""The expert ops (swiglu_experts, mlp_experts): values against a plain per-row loop, float64 gradchecks with an
expert that gets no rows, argument checks (shapes, dtypes, offsets), and the unchecked entries."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe import kernels
from tinymoe.functional import mlp_experts, swiglu_experts
from tinymoe.functional.experts import mlp_experts_unchecked, swiglu_experts_unchecked

N_EXPERTS, D_MODEL, D_FF = 3, 4, 5
OFFSETS = [0, 3, 3, 7]  # expert 1 gets no rows


def leaf(shape, seed, dtype="float64", scale=1.0):
    values = scale * np.random.default_rng(seed).standard_normal(shape)
    return tm.tensor(values, requires_grad=True, dtype=dtype)


def swiglu_inputs(dtype="float64"):
    xs = leaf((OFFSETS[-1], D_MODEL), 0, dtype)
    w1, w3 = leaf((N_EXPERTS, D_FF, D_MODEL), 1, dtype, 0.5), leaf((N_EXPERTS, D_FF, D_MODEL), 2, dtype, 0.5)
    w2 = leaf((N_EXPERTS, D_MODEL, D_FF), 3, dtype, 0.5)
    return xs, w1, w3, w2


def mlp_inputs(dtype="float64"):
    xs = leaf((OFFSETS[-1], D_MODEL), 4, dtype)
    w1, b1 = leaf((N_EXPERTS, D_FF, D_MODEL), 5, dtype, 0.5), leaf((N_EXPERTS, D_FF), 6, dtype, 0.5)
    w2, b2 = leaf((N_EXPERTS, D_MODEL, D_FF), 7, dtype, 0.5), leaf((N_EXPERTS, D_MODEL), 8, dtype, 0.5)
    return xs, w1, b1, w2, b2


def expert_of_row(row, offsets):
    return next(e for e in range(len(offsets) - 1) if offsets[e] <= row < offsets[e + 1])


SCALAR_ACTIVATIONS = {
    "relu": lambda v: max(v, 0.0),
    "silu": lambda v: v / (1.0 + math.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))),
}


def swiglu_by_loops(xs, w1, w3, w2, offsets):
    out = np.zeros((xs.shape[0], w2.shape[1]))
    for r in range(xs.shape[0]):
        e = expert_of_row(r, offsets)
        for i in range(w2.shape[1]):
            for f in range(w1.shape[1]):
                gate, up = float(w1[e, f] @ xs[r]), float(w3[e, f] @ xs[r])
                out[r, i] += w2[e, i, f] * SCALAR_ACTIVATIONS["silu"](gate) * up
    return out


def mlp_by_loops(xs, w1, b1, w2, b2, offsets, activation):
    out = np.zeros((xs.shape[0], w2.shape[1]))
    for r in range(xs.shape[0]):
        e = expert_of_row(r, offsets)
        hidden = [SCALAR_ACTIVATIONS[activation](float(w1[e, f] @ xs[r]) + b1[e, f]) for f in range(w1.shape[1])]
        for i in range(w2.shape[1]):
            out[r, i] = sum(w2[e, i, f] * hidden[f] for f in range(w1.shape[1])) + b2[e, i]
    return out


# ----- values and gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["numpy", "auto"])
def test_swiglu_experts_match_a_plain_loop(implementation):
    inputs = swiglu_inputs()
    with kernels.use(implementation):
        out = swiglu_experts(*inputs, OFFSETS)
    expected = swiglu_by_loops(*(t.numpy() for t in inputs), OFFSETS)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_mlp_experts_match_a_plain_loop(activation):
    inputs = mlp_inputs()
    out = mlp_experts(*inputs, OFFSETS, activation)
    expected = mlp_by_loops(*(t.numpy() for t in inputs), OFFSETS, activation)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["numpy", "auto"])
def test_gradcheck_swiglu_experts_with_an_idle_expert(implementation):
    inputs = swiglu_inputs()
    with kernels.use(implementation):
        assert tm.gradcheck(lambda *args: swiglu_experts(*args, OFFSETS), list(inputs))
        xs, w1, w3, w2 = inputs
        swiglu_experts(xs, w1, w3, w2, OFFSETS).sum().backward()
    for weight in (w1, w3, w2):
        assert not weight.grad[1].any()  # expert 1 saw no rows: exactly zero, not stale memory


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_gradcheck_mlp_experts_with_an_idle_expert(activation):
    inputs = mlp_inputs()
    assert tm.gradcheck(lambda *args: mlp_experts(*args, OFFSETS, activation), list(inputs))
    xs, w1, b1, w2, b2 = inputs
    mlp_experts(*inputs, OFFSETS, activation).sum().backward()
    for weight in (w1, b1, w2, b2):
        assert not weight.grad[1].any()


def test_no_rows_at_all():
    xs, w1, w3, w2 = swiglu_inputs()
    empty = tm.tensor(np.zeros((0, D_MODEL)), requires_grad=True, dtype="float64")
    out = swiglu_experts(empty, w1, w3, w2, [0, 0, 0, 0])
    assert out.shape == (0, D_MODEL)
    out.sum().backward()
    assert not w1.grad.any() and not w2.grad.any()


def test_unchecked_entries_give_the_same_bits():
    for public, unchecked, make, extra in ((swiglu_experts, swiglu_experts_unchecked, swiglu_inputs, ()),
                                           (mlp_experts, mlp_experts_unchecked, mlp_inputs, ("gelu",))):
        results = []
        for function in (public, unchecked):
            inputs = make()
            out = function(*inputs, np.asarray(OFFSETS), *extra)
            out.backward(np.random.default_rng(9).standard_normal(out.shape))
            results.append([out.numpy()] + [t.grad for t in inputs])
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)


# ----- argument checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("offsets, message", [
    ([0, 3, 7], r"expert_offsets must have E \+ 1 = 4 entries"),
    ([1, 3, 3, 7], "must start at 0 and end at the rows of xs \\(7\\), got 1 ... 7"),
    ([0, 3, 3, 6], "must start at 0 and end at the rows of xs"),
    ([0, 4, 3, 7], r"must be non-decreasing, got expert_offsets\[1\] = 4 > expert_offsets\[2\] = 3"),
])
def test_offsets_are_checked(offsets, message):
    with pytest.raises(ValueError, match=message):
        swiglu_experts(*swiglu_inputs(), offsets)
    with pytest.raises(ValueError, match=message):
        mlp_experts(*mlp_inputs(), offsets, "relu")


def test_offsets_must_be_host_integers():
    with pytest.raises(TypeError, match="expert_offsets must hold integers"):
        swiglu_experts(*swiglu_inputs(), [0.0, 3.0, 3.0, 7.0])


def test_shapes_and_dtypes_are_checked():
    xs, w1, w3, w2 = swiglu_inputs()
    with pytest.raises(ValueError, match="swiglu_experts: w3 must have shape"):
        swiglu_experts(xs, w1, w3[:2], w2, OFFSETS)
    with pytest.raises(ValueError, match=r"swiglu_experts: w2 must have shape \(E, d, ff\) = \(3, 4, 5\)"):
        swiglu_experts(xs, w1, w3, w3, OFFSETS)
    with pytest.raises(ValueError, match="xs has 3 columns"):
        swiglu_experts(xs[:, :3], w1, w3, w2, OFFSETS)
    with pytest.raises(TypeError, match="swiglu_experts: w1 is float32 but xs is float64"):
        swiglu_experts(xs, w1.astype("float32"), w3, w2, OFFSETS)
    with pytest.raises(TypeError, match="xs must be a Tensor"):
        swiglu_experts(xs.numpy(), w1, w3, w2, OFFSETS)
    xs, w1, b1, w2, b2 = mlp_inputs()
    with pytest.raises(ValueError, match=r"mlp_experts: b1 must have shape \(E, ff\) = \(3, 5\)"):
        mlp_experts(xs, w1, b2, w2, b2, OFFSETS, "relu")
    with pytest.raises(ValueError, match="activation='swiglu' is not supported; expected one of"):
        mlp_experts(xs, w1, b1, w2, b2, OFFSETS, "swiglu")


# ----- the schedule: expert blocks over the CPU cores with one-thread BLAS (functional/experts.py) ------------
def _blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]


def _float32_problem(seed=0, offsets=(0, 70, 70, 200, 321)):
    rng = np.random.default_rng(seed)
    arrays = (rng.standard_normal((offsets[-1], 48)), 0.2 * rng.standard_normal((4, 40, 48)),
              0.2 * rng.standard_normal((4, 40, 48)), 0.2 * rng.standard_normal((4, 48, 40)))
    return [a.astype(np.float32) for a in arrays], list(offsets)


def _step(arrays, offsets, cotangent_seed=9):
    tensors = [tm.tensor(a, requires_grad=True) for a in arrays]
    out = swiglu_experts(*tensors, offsets)
    cotangent = np.random.default_rng(cotangent_seed).standard_normal(out.shape).astype(np.float32)
    out.backward(tm.tensor(cotangent))
    return [out.numpy()] + [t.grad for t in tensors]


def _serial(monkeypatch):
    """Force the in-order schedule, as without threadpoolctl."""
    import tinymoe.functional.experts as experts_module
    monkeypatch.setitem(experts_module._pool, "controller", False)


@pytest.fixture
def over_the_pool(monkeypatch):
    """These problems are small: let them go over the pool anyway (run_blocks' MIN_PARALLEL_WORK)."""
    import tinymoe.functional.experts as experts_module
    monkeypatch.setattr(experts_module, "MIN_PARALLEL_WORK", 0)


def test_threaded_schedule_matches_float64_loops_and_restores_the_blas_threads(over_the_pool):
    before = _blas_threads()
    arrays, offsets = _float32_problem()
    out = _step(arrays, offsets)[0]
    expected = swiglu_by_loops(*(a.astype(np.float64) for a in arrays), offsets)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
    assert _blas_threads() == before  # the one-thread limit lasted for the region only
    import tinymoe.functional.experts as experts_module
    if experts_module._cores() >= 2:
        assert experts_module._pool["executor"] is not None  # the blocks did go over the pool


def test_results_are_deterministic_and_the_same_in_order_or_over_threads(monkeypatch, over_the_pool):
    arrays, offsets = _float32_problem(1)
    threaded = [_step(arrays, offsets) for _ in range(3)]
    for run in threaded[1:]:
        for first, again in zip(threaded[0], run):
            np.testing.assert_array_equal(first, again)
    _serial(monkeypatch)
    for first, serial in zip(threaded[0], _step(arrays, offsets)):
        np.testing.assert_allclose(serial, first, rtol=1e-5, atol=1e-5)  # BLAS may split sums differently


def test_concurrent_calls_from_two_threads_are_right_and_restore_the_blas_threads():
    import threading
    before = _blas_threads()
    arrays, offsets = _float32_problem(2)
    expected = _step(arrays, offsets)
    results, errors = [None] * 4, []

    def worker(i):
        try:
            results[i] = _step(arrays, offsets)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for result in results:
        for got, want in zip(result, expected):
            np.testing.assert_array_equal(got, want)
    assert _blas_threads() == before


@pytest.mark.parametrize("threads", ["in order", "over the pool"])
def test_a_retained_graph_gives_the_same_gradients_again(monkeypatch, threads):
    """With retain_graph=True the backward must leave its saved [a | b] intact (it writes [da | db] over it
    only on the last use): a second backward through the same graph gives the same bits."""
    import tinymoe.functional.experts as experts_module
    if threads == "over the pool" and (experts_module._cores() < 2 or experts_module._blas_controller() is None):
        pytest.skip("the blocks run in order here (one core or no threadpoolctl)")
    monkeypatch.setattr(experts_module, "MIN_PARALLEL_WORK", 0 if threads == "over the pool" else 1 << 62)
    arrays, offsets = _float32_problem(3)
    expected = _step(arrays, offsets)
    tensors = [tm.tensor(a, requires_grad=True) for a in arrays]
    out = swiglu_experts(*tensors, offsets)
    cotangent = tm.tensor(np.random.default_rng(9).standard_normal(out.shape).astype(np.float32))
    out.backward(cotangent, retain_graph=True)
    first = [t.grad.copy() for t in tensors]
    for t in tensors:
        t.grad = None
    out.backward(cotangent)
    for got_first, got_again, want in zip(first, [t.grad for t in tensors], expected[1:]):
        np.testing.assert_array_equal(got_first, want)
        np.testing.assert_array_equal(got_again, want)
    loops = swiglu_by_loops(*(a.astype(np.float64) for a in arrays), offsets)
    np.testing.assert_allclose(expected[0], loops, rtol=2e-4, atol=2e-4)


def test_the_last_backward_computes_in_place_and_a_retained_one_does_not():
    """Which buffers the SwiGLU backward kernel is handed: on the last use of the graph the saved [a | b] (as
    out) and dh (as h_out); with retain_graph=True fresh outputs, the saved [a | b] left as it was."""
    import types
    from tinymoe.kernels import reference

    calls = []

    def swiglu_backward(a, b, grad_h, out=None, h_out=None):
        calls.append(out is not None and out[0] is a and out[1] is b and h_out is grad_h)
        return reference.swiglu_backward(a, b, grad_h, out=out, h_out=h_out)
    spy = types.SimpleNamespace(**{name: getattr(reference, name) for name in kernels.PRIMITIVES})
    spy.swiglu_backward = swiglu_backward
    kernels.register("in-place-spy", spy, "cpu")
    try:
        with kernels.use("in-place-spy"):
            xs, w1, w3, w2 = swiglu_inputs()
            out = swiglu_experts(xs, w1, w3, w2, OFFSETS)
            out.sum().backward(retain_graph=True)
            retained, calls[:] = list(calls), []
            out.sum().backward()
    finally:
        kernels.unregister("in-place-spy")
    assert retained == [False, False] and calls == [True, True]  # two experts with rows, each once


def test_a_kernel_without_out_gives_the_same_gradients():
    """An implementation whose swiglu_backward takes no out= (like the CuPy one) goes through a concatenation."""
    import types
    from tinymoe.kernels import reference

    def swiglu_backward(a, b, grad_h):
        return reference.swiglu_backward(a, b, grad_h)
    spy = types.SimpleNamespace(**{name: getattr(reference, name) for name in kernels.PRIMITIVES})
    spy.swiglu_backward = swiglu_backward
    kernels.register("no-out", spy, "cpu")
    try:
        inputs = swiglu_inputs()
        with kernels.use("no-out"):
            swiglu_experts(*inputs, OFFSETS).sum().backward()
        without_out = [t.grad.copy() for t in inputs]
        fresh = swiglu_inputs()
        with kernels.use("numpy"):
            swiglu_experts(*fresh, OFFSETS).sum().backward()
        for got, want in zip(without_out, (t.grad for t in fresh)):
            np.testing.assert_array_equal(got, want)
    finally:
        kernels.unregister("no-out")


def test_little_work_runs_in_order_without_the_pool(monkeypatch):
    import tinymoe.functional.experts as experts_module
    monkeypatch.setitem(experts_module._pool, "executor", None)
    arrays, offsets = _float32_problem()
    out = _step(arrays, offsets)[0]  # 321 rows · 48 · 40: far below MIN_PARALLEL_WORK
    assert experts_module._pool["executor"] is None
    np.testing.assert_allclose(out, swiglu_by_loops(*(a.astype(np.float64) for a in arrays), offsets),
                               rtol=2e-4, atol=2e-4)
