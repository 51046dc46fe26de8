"""The kernel choice as a ContextVar (per thread and async task), registering an implementation, and Functions
binding their kernels in forward: a backward run outside `use(...)` still runs the forward's implementation."""
import asyncio
import os
import threading
import types

import numpy as np
import pytest

import tinymoe as tm
from tinymoe import kernels
from tinymoe.functional.dispatch import combine_rows, gather_rows
from tinymoe.functional.experts import swiglu_experts
from tinymoe.kernels import reference


def spy_implementation():
    """A module-like object whose primitives run the reference and record their names in `calls`."""
    calls = []

    def recording(primitive):
        def run(*args, **kwargs):
            calls.append(primitive)
            return getattr(reference, primitive)(*args, **kwargs)
        return run

    spy = types.SimpleNamespace(**{primitive: recording(primitive) for primitive in kernels.PRIMITIVES})
    spy.calls = calls
    return spy


@pytest.fixture
def spy():
    implementation = spy_implementation()
    kernels.register("spy", implementation, "cpu")
    yield implementation
    kernels.unregister("spy")


# ----- ContextVar ----------------------------------------------------------------------------------------
def test_a_thread_does_not_see_another_threads_choice():
    seen = {}

    def worker():
        seen["before"] = kernels.current()
        kernels.use("numpy")  # a plain call: lasts for this thread only
        seen["after"] = kernels.current()

    outer = kernels.current()
    with kernels.use("numpy"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert kernels.current() == "numpy"
    environment = os.environ.get("TINYMOE_KERNELS", "auto").strip().lower() or "auto"
    assert seen == {"before": environment, "after": "numpy"}
    assert kernels.current() == outer


def test_async_tasks_keep_their_own_choice():
    async def task(name, log):
        with kernels.use(name):
            await asyncio.sleep(0)  # the other task runs here, inside its own `use`
            log.append((name, kernels.current()))
            await asyncio.sleep(0)
            log.append((name, kernels.current()))

    async def main():
        log = []
        await asyncio.gather(task("numpy", log), task("auto", log))
        return log

    log = asyncio.run(main())
    assert len(log) == 4 and all(name == seen for name, seen in log)


def test_use_resets_its_token_even_when_nested_plain_calls_happened():
    before = kernels.current()
    with kernels.use("numpy"):
        kernels.use("auto")  # a plain call inside the block ends with the block
        assert kernels.current() == "auto"
    assert kernels.current() == before


# ----- registering an implementation ----------------------------------------------------------------------
def test_register_makes_a_choice_and_unregister_removes_it(spy):
    assert "spy" in kernels.choices() and "spy" in kernels.available("cpu")
    assert "spy" not in kernels.available("cuda")  # registered for CPU arrays only
    with kernels.use("spy"):
        assert kernels.chosen("cpu") == "spy"
        assert kernels.implementation(np.zeros(1)) is spy
    kernels.unregister("spy")
    try:
        assert "spy" not in kernels.choices()
        with pytest.raises(ValueError, match="'spy' is unknown"):
            kernels.use("spy")
    finally:
        kernels.register("spy", spy, "cpu")  # the fixture unregisters it


def test_register_refuses_bad_implementations():
    with pytest.raises(ValueError, match="built-in"):
        kernels.register("numpy", reference)
    with pytest.raises(TypeError, match="lacks the primitives swiglu, swiglu_backward"):
        kernels.register("partial", types.SimpleNamespace(**{p: print for p in kernels.PRIMITIVES[:-2]}))
    with pytest.raises(ValueError, match="device='gpu'"):
        kernels.register("elsewhere", reference, "gpu")
    with pytest.raises(KeyError, match="no registered kernel implementation 'never'"):
        kernels.unregister("never")
    assert kernels.choices() == kernels.CHOICES


# ----- kernels bound at forward -----------------------------------------------------------------------
def dispatch_loss(x, weights, plan):
    rows = gather_rows(x, plan.row_token, token_rows=plan.assignment_row)
    out = combine_rows(rows * rows, plan.assignment_row, weights, row_assignment=plan.row_assignment)
    return (out * out).sum()


def dispatch_inputs():
    rng = np.random.default_rng(0)
    plan = reference.routing_plan(np.array([[0, 1], [1, 2], [2, 0], [0, 2]]), 3)
    x = tm.tensor(rng.standard_normal((4, 3)), requires_grad=True, dtype="float64")
    weights = tm.tensor(rng.random((4, 2)), requires_grad=True, dtype="float64")
    return x, weights, plan


def test_backward_outside_use_runs_the_forwards_implementation(spy):
    x, weights, plan = dispatch_inputs()
    with kernels.use("spy"):
        loss = dispatch_loss(x, weights, plan)
    assert spy.calls == ["gather_rows", "combine_rows"]
    with kernels.use("numpy"):  # a different choice while backward runs: it must not matter
        loss.backward()
    # CombineRows' backward: dy by a gather, dw by combine_weights_grad; GatherRows' backward: dx by combine_rows
    assert spy.calls[2:] == ["gather_rows", "combine_weights_grad", "combine_rows"]


def test_backward_inside_use_does_not_switch_to_it(spy):
    x, weights, plan = dispatch_inputs()
    with kernels.use("numpy"):
        loss = dispatch_loss(x, weights, plan)
    with kernels.use("spy"):
        loss.backward()
    assert spy.calls == []
    expected_x, expected_w = x.grad.copy(), weights.grad.copy()
    x.grad = weights.grad = None
    with kernels.use("spy"):
        dispatch_loss(x, weights, plan).backward()
    np.testing.assert_array_equal(x.grad, expected_x)  # same reference arithmetic, same bits
    np.testing.assert_array_equal(weights.grad, expected_w)


def test_swiglu_experts_backward_uses_the_forwards_kernels(spy):
    rng = np.random.default_rng(1)
    xs = tm.tensor(rng.standard_normal((5, 3)), requires_grad=True, dtype="float64")
    w1, w3 = (tm.tensor(rng.standard_normal((2, 4, 3)), requires_grad=True, dtype="float64") for _ in range(2))
    w2 = tm.tensor(rng.standard_normal((2, 3, 4)), requires_grad=True, dtype="float64")
    with kernels.use("spy"):
        out = swiglu_experts(xs, w1, w3, w2, [0, 2, 5])
    assert spy.calls == ["swiglu", "swiglu"]  # one call per expert block
    out.sum().backward()
    assert spy.calls[2:] == ["swiglu_backward", "swiglu_backward"]
