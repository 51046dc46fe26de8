"""The graph and backward(): accumulation, what is recorded, the order nodes run in, retain_graph and errors."""
import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf


# ----- gradient accumulation --------------------------------------------------------------------------------
def test_tensor_used_twice_accumulates(device):
    x = leaf([1.0, -2.0, 3.0], device)
    (x * x + x).sum().backward()   # d/dx (x^2 + x) = 2x + 1
    np.testing.assert_array_equal(host(x.grad), [3.0, -3.0, 7.0])


def test_same_tensor_twice_in_one_op():
    x = leaf([1.0, 2.0])
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])
    y = leaf([3.0, 4.0])
    (y - y).sum().backward()
    np.testing.assert_array_equal(y.grad, [0.0, 0.0])
    z = leaf([3.0, 4.0])
    (z / z).sum().backward()
    np.testing.assert_allclose(z.grad, [0.0, 0.0], atol=1e-15)


# Sums of two gradients go in place into arrays the engine made in this backward(); never into the caller's.
def test_sums_in_place_never_write_into_the_callers_arrays(device):
    xp = np if device == "cpu" else __import__("cupy")
    x = leaf(np.arange(6.0).reshape(2, 3), device)
    rows = x.reshape(3, 2)                        # one view used by two ops: its two gradients are summed
    cotangent = tm.tensor(np.full((3, 2), 2.0), device=device)
    kept_cotangent = host(cotangent).copy()
    out = rows * rows + rows * 3.0                 # d/dx = (2x + 3) · cotangent
    out.backward(cotangent)
    np.testing.assert_array_equal(host(x.grad), (2 * np.arange(6.0) + 3).reshape(2, 3) * 2.0)
    np.testing.assert_array_equal(host(cotangent), kept_cotangent)  # the caller's cotangent is untouched
    held = x.grad                                  # the caller holds the first .grad ...
    held_values = host(held).copy()
    again = x.reshape(3, 2)
    (again * again + again * 3.0).backward(cotangent)  # ... a second backward adds into a new array
    np.testing.assert_array_equal(host(held), held_values)
    np.testing.assert_array_equal(host(x.grad), 2 * held_values)
    assert isinstance(x.grad, xp.ndarray)


def test_a_gradient_handed_to_two_inputs_is_summed_without_being_overwritten():
    """Add gives its one incoming gradient to both inputs (not fresh): summing the two must not write into it."""
    x, y = leaf([1.0, 2.0]), leaf([10.0, 20.0])
    middle = x + y                  # Add.backward hands the same array to x and y
    (middle * 1.0 + middle * 1.0 + x).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])
    np.testing.assert_array_equal(y.grad, [2.0, 2.0])


def test_a_0d_tensor_reached_three_times_sums_its_scalar_gradients():
    """0-d ops may hand on NumPy scalars (not arrays): those are summed, never written into."""
    x = leaf(np.arange(4.0))
    m = x.mean()
    ((x - m) * m + m).sum().backward()   # m gets three gradients; f = m·Σ(x − m) + 4m = 4m, df/dx = 1
    np.testing.assert_allclose(x.grad, [1.0, 1.0, 1.0, 1.0])
    y = leaf(np.arange(4.0))
    s = (y * y).sum()
    (s * 2.0 + s * s + s).backward()     # df/dy = (2 + 2s + 1) · 2y, s = 14
    np.testing.assert_allclose(y.grad, (2 + 2 * 14.0 + 1) * 2 * np.arange(4.0))


def test_a_grad_the_caller_set_in_another_dtype_is_added_to_as_before():
    x = leaf([1.0, 2.0])
    x.grad = np.array([0.5, 0.5], dtype=np.float32)
    (x * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.5, 2.5])


def test_diamond_graph_sums_both_paths_through_an_intermediate():
    x = leaf([1.0, 2.0])
    y = x * 3.0                    # intermediate used by two branches
    z = y * y + 2.0 * y            # dz/dy = 2y + 2, dy/dx = 3
    z.sum().backward()
    np.testing.assert_allclose(x.grad, 3.0 * (2 * 3.0 * np.array([1.0, 2.0]) + 2.0))


def test_gradients_accumulate_across_backward_calls_until_zeroed():
    x = leaf([1.0, 2.0])
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, 5.0])
    x.zero_grad()
    assert x.grad is None
    (x * 4.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [4.0, 4.0])


def test_backward_on_a_leaf_fills_its_own_grad():
    x = leaf(3.0)
    x.backward()
    assert x.grad == 1.0
    v = leaf([1.0, 2.0])
    v.backward(np.array([5.0, 6.0]))
    np.testing.assert_array_equal(v.grad, [5.0, 6.0])


def test_grad_is_a_fresh_array_not_an_alias_of_the_cotangent():
    x = leaf([1.0, 2.0])
    cotangent = np.array([5.0, 6.0])
    (x + 0.0).backward(cotangent)
    cotangent[:] = 0.0
    np.testing.assert_array_equal(x.grad, [5.0, 6.0])


def test_leaf_grad_is_writable_after_a_broadcast_backward():
    x = leaf(np.zeros((2, 3)))
    x.sum().backward()  # Sum's backward may hand back a read-only broadcast view
    x.grad[0, 0] = 7.0
    assert x.grad[0, 0] == 7.0 and x.grad[1, 1] == 1.0


class _Scale(tm.Function):
    """y = 2x, whose backward returns the same new array for both uses of `returned`."""

    @staticmethod
    def forward(ctx, x, y):
        return 2 * x + 2 * y

    @staticmethod
    def backward(ctx, grad):
        ctx.returned = 2 * grad
        return ctx.returned, ctx.returned


class _FreshScale(_Scale):
    fresh_gradients = True

    @staticmethod
    def backward(ctx, grad):
        ctx.returned = (2 * grad, 2 * grad)
        return ctx.returned


def test_leaf_grads_are_copies_unless_the_function_promises_fresh_arrays():
    x, y = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    node_output = _Scale.apply(x, y)
    context = node_output._node.ctx
    node_output.sum().backward()
    assert x.grad is not context.returned and y.grad is not context.returned
    x.grad += 1.0  # an optimizer's in-place update of one leaf's grad leaves the other alone
    np.testing.assert_array_equal(y.grad, [2.0, 2.0])

    x, y = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    node_output = _FreshScale.apply(x, y)
    context = node_output._node.ctx
    node_output.sum().backward()
    assert x.grad is context.returned[0] and y.grad is context.returned[1]  # taken over, not copied


def test_scalar_leaf_grad_is_an_ndarray():
    x = leaf(3.0)
    (x * x).backward()
    assert x.grad == 6.0
    assert isinstance(x.grad, np.ndarray), f"a 0-d leaf got a .grad of type {type(x.grad).__name__}"


def test_grad_dtype_and_shape_match_the_leaf(device):
    for dtype in ("float32", "float64"):
        x = tm.tensor(np.ones((2, 3)), dtype=dtype, device=device, requires_grad=True)
        (x * 2.0).mean().backward()
        assert x.grad.dtype == np.dtype(dtype) and x.grad.shape == (2, 3)
        np.testing.assert_allclose(host(x.grad), np.full((2, 3), 2.0 / 6.0), rtol=1e-6)


def test_backward_accepts_cotangent_as_list_array_or_tensor():
    for cotangent in ([1.0, -2.0], np.array([1.0, -2.0]), tm.tensor([1.0, -2.0], dtype="float64")):
        x = leaf([3.0, 4.0])
        (x * x).backward(cotangent)
        np.testing.assert_array_equal(x.grad, [6.0, -16.0])


def test_cotangent_tensor_of_another_dtype_gives_grad_of_the_leaf_dtype():
    x = tm.tensor([1.0, 2.0], requires_grad=True)                # float32
    hidden = (x * 2.0).retain_grad()
    hidden.backward(tm.tensor([1.0, 1.0], dtype="float64"))
    assert x.grad.dtype == np.float32 and hidden.grad.dtype == np.float32
    leaf32 = tm.tensor([1.0, 2.0], requires_grad=True)
    leaf32.backward(tm.tensor([1.0, 1.0], dtype="float64"))
    assert leaf32.grad.dtype == np.float32


# ----- what the graph records ---------------------------------------------------------------------------
def test_requires_grad_propagates_only_from_inputs_that_require_it():
    a, b = leaf([1.0]), leaf([2.0], requires_grad=False)
    assert (a * b).requires_grad and not (a * b).is_leaf
    plain = b * b
    assert not plain.requires_grad and plain.is_leaf
    with pytest.raises(RuntimeError, match="require"):
        plain.sum().backward()


def test_only_leaves_get_grad_unless_retain_grad():
    x = leaf([1.0, 2.0])
    hidden = x * 2.0
    kept = (x * 3.0).retain_grad()
    (hidden * kept).sum().backward()    # = 6 x^2
    assert hidden.grad is None
    np.testing.assert_array_equal(kept.grad, 2.0 * np.array([1.0, 2.0]))   # d/dkept = hidden
    np.testing.assert_array_equal(x.grad, 12.0 * np.array([1.0, 2.0]))


def test_input_not_requiring_grad_gets_no_grad():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    (a * b).sum().backward()
    assert b.grad is None
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])


class CountingIdentity(tm.Function):
    """Identity that records every gradient its backward receives."""

    received = []

    @staticmethod
    def forward(ctx, x):
        return x.copy()

    @staticmethod
    def backward(ctx, grad):
        CountingIdentity.received.append(np.array(grad))
        return grad


def test_each_node_runs_backward_once_with_its_total_gradient():
    CountingIdentity.received = []
    x = leaf([1.0, 2.0])
    y = CountingIdentity.apply(x)
    # y feeds three consumers at different depths: its backward must wait for all of them
    z = (y * 2.0) + ((y * 3.0) * 1.0).reshape(2) + y.sum()
    z.sum().backward()
    assert len(CountingIdentity.received) == 1
    np.testing.assert_array_equal(CountingIdentity.received[0], [7.0, 7.0])
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])


def test_unused_branch_does_not_run():
    CountingIdentity.received = []
    x = leaf([1.0, 2.0])
    unused = CountingIdentity.apply(x) * 5.0  # noqa: F841 (kept alive on purpose)
    (x * 2.0).sum().backward()
    assert CountingIdentity.received == []
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])


# ----- errors ------------------------------------------------------------------------------------------------
def test_backward_without_grad_on_non_scalar_names_the_shape():
    y = leaf(np.ones((2, 3))) * 2.0
    with pytest.raises(RuntimeError) as info:
        y.backward()
    assert "(2, 3)" in str(info.value) and "grad" in str(info.value)


def test_backward_without_grad_on_one_element_tensor_is_allowed():
    x = leaf([[2.0]])
    (x * x).backward()
    np.testing.assert_array_equal(x.grad, [[4.0]])


@pytest.mark.parametrize("bad_shape", [(3, 2), (6,), (2, 3, 1), ()])
def test_backward_grad_of_wrong_shape_names_both_shapes(bad_shape):
    y = leaf(np.ones((2, 3))) * 2.0
    with pytest.raises(ValueError) as info:
        y.backward(np.ones(bad_shape))
    message = str(info.value)
    assert str(bad_shape) in message and "(2, 3)" in message


def test_backward_grad_tensor_of_wrong_shape_is_refused():
    y = leaf(np.ones(3)) * 2.0
    with pytest.raises(ValueError, match=r"\(4,\)"):
        y.backward(tm.tensor(np.ones(4), dtype="float64"))


def test_backward_twice_without_retain_graph_is_an_error_mentioning_retain_graph():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])  # the failed call added nothing


def test_backward_twice_through_a_graph_without_saved_arrays_is_also_refused():
    x = leaf([1.0, 2.0])
    y = (x + 1.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_allows_a_second_backward_and_grads_add():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(x.grad, [4.0, 8.0])


def test_backward_on_tensor_that_does_not_require_grad():
    with pytest.raises(RuntimeError, match="require"):
        tm.tensor([1.0]).backward()
