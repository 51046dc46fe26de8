"""no_grad (nothing recorded or saved, per thread, as a decorator), when saved arrays are freed, and graphs
deeper than Python's recursion limit."""
import gc
import threading
import weakref

import numpy as np
import pytest

import tinymoe as tm
from helpers import leaf


# ----- no_grad -----------------------------------------------------------------------------------------------
class RecordingMul(tm.Function):
    """a * b that keeps its context, so a test can see what was saved."""

    contexts = []

    @staticmethod
    def forward(ctx, a, b):
        RecordingMul.contexts.append(ctx)
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, grad * a


def test_no_grad_records_no_graph():
    x = leaf([1.0, 2.0])
    with tm.no_grad():
        assert tm.is_grad_enabled() is False
        y = (x * 2.0 + 1.0).sum()
    assert tm.is_grad_enabled() is True
    assert y.requires_grad is False and y.is_leaf and y._node is None
    with pytest.raises(RuntimeError):
        y.backward()
    assert x.grad is None


def test_no_grad_saves_nothing_in_the_context():
    RecordingMul.contexts = []
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    with tm.no_grad():
        out = RecordingMul.apply(a, b)
    (ctx,) = RecordingMul.contexts
    assert ctx.saved_tensors == ()
    assert ctx.requires_grad is False
    np.testing.assert_array_equal(out.numpy(), [3.0, 8.0])
    # control: with grad enabled the same op keeps both inputs
    RecordingMul.contexts = []
    RecordingMul.apply(a, b)
    (ctx,) = RecordingMul.contexts
    assert len(ctx.saved_tensors) == 2 and ctx.requires_grad is True


def _weak_inputs_of_a_product(record):
    """Multiply two big fresh tensors, drop our references to them, return (output, weakrefs to their arrays)."""
    a = leaf(np.ones(100_000))
    b = leaf(np.full(100_000, 2.0))
    refs = (weakref.ref(a.data), weakref.ref(b.data))
    if record:
        out = a * b
    else:
        with tm.no_grad():
            out = a * b
    del a, b
    gc.collect()
    return out, refs


def test_no_grad_output_keeps_no_input_array_alive():
    out, refs = _weak_inputs_of_a_product(record=False)
    assert all(ref() is None for ref in refs), "an output made under no_grad still holds its inputs"
    assert out.numpy()[0] == 2.0
    recorded, recorded_refs = _weak_inputs_of_a_product(record=True)
    assert all(ref() is not None for ref in recorded_refs)  # control: the probe sees what a graph keeps


class SquareSavingAnIntermediate(tm.Function):
    """out = x**2 computed as x * x; saves a fresh array 2x (not an input, not the output) for backward."""

    saved_refs = []

    @staticmethod
    def forward(ctx, x):
        twice = 2.0 * x
        SquareSavingAnIntermediate.saved_refs.append(weakref.ref(twice))
        ctx.save_for_backward(twice)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (twice,) = ctx.saved_tensors
        return grad * twice


def test_saved_arrays_live_until_the_last_backward_and_never_under_no_grad():
    SquareSavingAnIntermediate.saved_refs = []
    x = leaf(np.arange(1000.0))
    with tm.no_grad():
        unrecorded = SquareSavingAnIntermediate.apply(x)
    gc.collect()
    assert SquareSavingAnIntermediate.saved_refs[-1]() is None, "no_grad kept a saved array"
    np.testing.assert_array_equal(unrecorded.numpy(), np.arange(1000.0) ** 2)

    out = SquareSavingAnIntermediate.apply(x)
    saved = SquareSavingAnIntermediate.saved_refs[-1]
    gc.collect()
    assert saved() is not None                      # kept for backward
    out.sum().backward(retain_graph=True)
    gc.collect()
    assert saved() is not None                      # retain_graph keeps it
    out.sum().backward()
    gc.collect()
    assert saved() is None, "backward() without retain_graph left a saved array alive"
    np.testing.assert_array_equal(x.grad, 2 * 2.0 * np.arange(1000.0))


def test_holding_the_loss_after_backward_does_not_keep_activations_alive():
    x = leaf(np.ones(100_000))
    hidden = x * 2.0            # an activation: the data of a non-leaf tensor
    shifted = hidden + 1.0      # Add saves nothing
    loss = shifted.sum()
    activation = weakref.ref(hidden.data)
    del hidden, shifted
    loss.backward()
    gc.collect()
    assert loss.item() == 300_000.0
    assert activation() is None, "the loss still holds an activation array after backward()"


def test_inputs_without_requires_grad_are_not_saved_even_with_grad_enabled():
    RecordingMul.contexts = []
    a, b = leaf([1.0], requires_grad=False), leaf([2.0], requires_grad=False)
    out = RecordingMul.apply(a, b)
    assert RecordingMul.contexts[0].saved_tensors == ()
    assert out._node is None and not out.requires_grad


def test_no_grad_restores_state_after_an_exception_and_nests():
    with pytest.raises(KeyError):
        with tm.no_grad():
            raise KeyError("boom")
    assert tm.is_grad_enabled()
    with tm.no_grad():
        with tm.no_grad():
            pass
        assert not tm.is_grad_enabled()   # the inner exit restores the outer state, not True
    assert tm.is_grad_enabled()


def test_no_grad_as_decorator():
    @tm.no_grad()
    def double(t):
        """Doubles."""
        assert not tm.is_grad_enabled()
        return t * 2.0

    out = double(leaf([1.0]))
    assert not out.requires_grad and out._node is None
    assert tm.is_grad_enabled()
    assert double.__name__ == "double" and double.__doc__ == "Doubles."


def test_no_grad_is_per_thread():
    seen = {}

    def other_thread():
        seen["enabled"] = tm.is_grad_enabled()
        seen["records"] = (leaf([1.0]) * 2.0).requires_grad

    with tm.no_grad():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen == {"enabled": True, "records": True}


# ----- deep graphs -------------------------------------------------------------------------------------------
def test_backward_through_a_100k_deep_chain_does_not_recurse():
    depth = 100_000
    x = leaf([1.0, 2.0])
    y = x
    for _ in range(depth):
        y = -y                          # an even number of negations: dy/dx = 1
    y = y * 3.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])
    del y
    gc.collect()                        # tearing down the deep graph must not crash either


def test_deep_chain_with_a_second_use_of_the_leaf_at_every_step():
    depth = 2_000
    x = leaf([0.5])
    y = x * 0.0
    for _ in range(depth):
        y = y + x                       # y = depth * x after the loop
    y.backward(np.array([1.0]))
    np.testing.assert_array_equal(x.grad, [float(depth)])
