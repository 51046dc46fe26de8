"""`tinymoe.Function`: user-written ops, what `apply` passes to forward, multi-output forwards, device checks."""
import numpy as np
import pytest

import tinymoe as tm
from helpers import host, leaf


class Cube(tm.Function):
    """The example from the issue: y = x**3, dx = 3 x**2 g."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def test_cube_forward_backward_and_gradcheck(device):
    x = np.array([[-1.5, 0.5, 2.0], [0.0, 1.0, -3.0]])
    t = leaf(x, device)
    y = Cube.apply(t)
    assert isinstance(y, tm.Tensor) and y.requires_grad and y.device == device
    np.testing.assert_allclose(host(y), x**3)
    cotangent = np.arange(6.0).reshape(2, 3)
    y.backward(tm.tensor(cotangent, dtype="float64", device=device))
    np.testing.assert_allclose(host(t.grad), 3 * x**2 * cotangent)
    assert tm.gradcheck(Cube.apply, [leaf(x, device)])


def test_cube_composes_with_builtin_ops():
    x = leaf([1.0, 2.0])
    (Cube.apply(x * 2.0) + x).sum().backward()  # d/dx (8x^3 + x) = 24x^2 + 1
    np.testing.assert_allclose(x.grad, [25.0, 97.0])


def test_cube_keeps_float32():
    y = Cube.apply(tm.tensor([2.0], requires_grad=True))
    assert y.dtype == np.float32
    y.backward()
    assert y.numpy()[0] == 8.0


def test_cube_on_a_0d_tensor():
    x = leaf(2.0)
    y = Cube.apply(x)
    assert isinstance(y, tm.Tensor) and y.shape == () and y.item() == 8.0
    y.backward()
    assert float(x.grad) == 12.0


# ----- what forward receives ---------------------------------------------------------------------------------
class Probe(tm.Function):
    """Records what forward was given; out = scale * x (+ y), with non-tensor arguments in between."""

    seen = {}

    @staticmethod
    def forward(ctx, x, scale, y=None, *, mode="plain", options=None):
        Probe.seen = dict(x=x, scale=scale, y=y, mode=mode, options=options, xp=ctx.xp,
                          needs_input_grad=ctx.needs_input_grad, requires_grad=ctx.requires_grad)
        ctx.scale = scale
        return scale * x if y is None else scale * x + y

    @staticmethod
    def backward(ctx, grad):
        if len(ctx.needs_input_grad) == 1:
            return grad * ctx.scale
        return grad * ctx.scale, grad


def test_non_tensor_arguments_pass_through_unchanged():
    options = {"k": [1, 2]}
    x = leaf([1.0, 2.0])
    out = Probe.apply(x, 2.5, mode="fancy", options=options)
    assert Probe.seen["scale"] == 2.5
    assert Probe.seen["mode"] == "fancy"
    assert Probe.seen["options"] is options
    assert Probe.seen["y"] is None
    np.testing.assert_array_equal(out.numpy(), [2.5, 5.0])
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, [2.5, 2.5])   # ctx attributes survive to backward


def test_tensors_arrive_as_arrays_of_their_module():
    x = leaf([1.0, 2.0])
    Probe.apply(x, 1.0)
    assert type(Probe.seen["x"]) is np.ndarray and Probe.seen["x"] is x.data
    assert Probe.seen["xp"] is np


def test_needs_input_grad_and_requires_grad_per_call():
    a, b = leaf([1.0]), leaf([2.0], requires_grad=False)
    Probe.apply(a, 3.0, b)
    assert Probe.seen["needs_input_grad"] == (True, False) and Probe.seen["requires_grad"] is True
    Probe.apply(b, 3.0, a)
    assert Probe.seen["needs_input_grad"] == (False, True)
    Probe.apply(b, 3.0, b)
    assert Probe.seen["needs_input_grad"] == (False, False) and Probe.seen["requires_grad"] is False
    with tm.no_grad():
        Probe.apply(a, 3.0, b)
    assert Probe.seen["requires_grad"] is False


class LastUseProbe(tm.Function):
    """Records ctx.last_use as each backward sees it."""
    seen = []

    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, grad):
        LastUseProbe.seen.append(ctx.last_use)
        return 2.0 * grad


def test_last_use_tells_a_backward_whether_its_saved_arrays_serve_again():
    LastUseProbe.seen.clear()
    x = leaf([1.0, 2.0])
    y = LastUseProbe.apply(x).sum()
    y.backward(retain_graph=True)  # the graph is kept for another backward: saved arrays must stay intact
    y.backward()                   # the last one: a backward may overwrite buffers its forward saved
    assert LastUseProbe.seen == [False, True]
    np.testing.assert_array_equal(host(x.grad), [4.0, 4.0])


class FailsOnce(tm.Function):
    """A backward that raises part-way the first time (as an interrupted one would)."""
    failed = False

    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, grad):
        if not FailsOnce.failed:
            FailsOnce.failed = True
            raise KeyboardInterrupt
        return 2.0 * grad


def test_a_backward_that_failed_part_way_cannot_be_rerun_on_what_it_used_up():
    """On its last use a backward may overwrite its saved buffers (SwiGLUExperts does): after it failed
    part-way, running it again would compute from half-overwritten arrays, so it is refused, clearly."""
    FailsOnce.failed = False
    x, ones = leaf([1.0, 2.0]), tm.tensor([1.0, 1.0])
    y = FailsOnce.apply(x)
    with pytest.raises(KeyboardInterrupt):
        y.backward(ones)
    with pytest.raises(RuntimeError, match=r"FailsOnce a second time.*used up by one that failed part-way"):
        y.backward(ones)
    retained = FailsOnce.apply(x)  # with retain_graph=True nothing is used up: a retry works
    FailsOnce.failed = False
    with pytest.raises(KeyboardInterrupt):
        retained.backward(ones, retain_graph=True)
    retained.backward(ones)
    np.testing.assert_array_equal(host(x.grad), [2.0, 2.0])


def test_gradient_reaches_only_tensor_inputs_in_order():
    a, b = leaf([1.0, 2.0]), leaf([10.0, 20.0])
    Probe.apply(a, 4.0, b).sum().backward()
    np.testing.assert_array_equal(a.grad, [4.0, 4.0])
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_apply_without_any_tensor_is_a_type_error_naming_the_function():
    with pytest.raises(TypeError, match="Probe"):
        Probe.apply(np.ones(2), 1.0)


def test_tensor_as_keyword_argument_is_refused_naming_it():
    with pytest.raises(TypeError, match="options"):
        Probe.apply(leaf([1.0]), 1.0, options=leaf([2.0]))


def test_unimplemented_function_raises_not_implemented():
    class Nothing(tm.Function):
        pass

    with pytest.raises(NotImplementedError):
        Nothing.apply(leaf([1.0]))


# ----- what backward may return ------------------------------------------------------------------------------
class WrongShapeGrad(tm.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad.sum(keepdims=True)   # shape (1,) for an input of shape (3,)


class TooManyGrads(tm.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


class NoGradForSecond(tm.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a * 2 + b

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad, None


def test_backward_returning_a_wrong_shape_names_function_and_shapes():
    out = WrongShapeGrad.apply(leaf([1.0, 2.0, 3.0]))
    with pytest.raises(RuntimeError) as info:
        out.sum().backward()
    message = str(info.value)
    assert "WrongShapeGrad" in message and "(1,)" in message and "(3,)" in message


def test_backward_returning_too_many_gradients_is_an_error():
    out = TooManyGrads.apply(leaf([1.0]))
    with pytest.raises(RuntimeError, match="TooManyGrads.*2"):
        out.sum().backward()


def test_backward_returning_none_leaves_that_input_without_grad():
    a, b = leaf([1.0]), leaf([2.0])
    NoGradForSecond.apply(a, b).sum().backward()
    np.testing.assert_array_equal(a.grad, [2.0])
    assert b.grad is None


# ----- multi-output forwards ---------------------------------------------------------------------------------
class MaxWithIndex(tm.Function):
    """Row maximum and its column: (values: float (n,), index: int (n,)). dx = g at the arg max."""

    @staticmethod
    def forward(ctx, x):
        index = x.argmax(axis=1)
        ctx.index, ctx.shape = index, x.shape
        return x[np.arange(x.shape[0]), index], index

    @staticmethod
    def backward(ctx, grad_values):
        grad_x = np.zeros(ctx.shape)
        grad_x[np.arange(ctx.shape[0]), ctx.index] = grad_values
        return grad_x


class TwoScalings(tm.Function):
    """(2x, 3x); dx = 2 g0 + 3 g1. Records the gradients it receives."""

    received = None

    @staticmethod
    def forward(ctx, x):
        return 2 * x, 3 * x

    @staticmethod
    def backward(ctx, grad_double, grad_triple):
        TwoScalings.received = (np.array(grad_double), np.array(grad_triple))
        return 2 * grad_double + 3 * grad_triple


def test_integer_output_passes_through_plain_and_float_output_is_a_tensor():
    x = leaf([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]])
    values, index = MaxWithIndex.apply(x)
    assert isinstance(values, tm.Tensor) and values.requires_grad
    assert isinstance(index, np.ndarray) and not isinstance(index, tm.Tensor)
    assert index.dtype.kind == "i"
    np.testing.assert_array_equal(index, [1, 0])
    np.testing.assert_array_equal(values.numpy(), [5.0, 7.0])
    values.backward(np.array([2.0, 3.0]))       # backward gets one gradient: for the float output only
    np.testing.assert_array_equal(x.grad, [[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]])


def test_two_float_outputs_both_used():
    x = leaf([1.0, 2.0])
    double, triple = TwoScalings.apply(x)
    assert isinstance(double, tm.Tensor) and isinstance(triple, tm.Tensor)
    (double * 10.0 + triple).sum().backward()
    np.testing.assert_array_equal(TwoScalings.received[0], [10.0, 10.0])
    np.testing.assert_array_equal(TwoScalings.received[1], [1.0, 1.0])
    np.testing.assert_array_equal(x.grad, [23.0, 23.0])


def test_unused_output_gets_a_zero_gradient():
    x = leaf([1.0, 2.0])
    _, triple = TwoScalings.apply(x)
    triple.sum().backward()
    np.testing.assert_array_equal(TwoScalings.received[0], [0.0, 0.0])
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


def test_multi_output_gradcheck():
    x = np.array([0.5, -1.0, 2.0])
    assert tm.gradcheck(TwoScalings.apply, [leaf(x)])
    assert tm.gradcheck(lambda t: MaxWithIndex.apply(t)[0], [leaf([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]])])


def test_multi_output_under_no_grad():
    with tm.no_grad():
        double, triple = TwoScalings.apply(leaf([1.0]))
    assert not double.requires_grad and not triple.requires_grad
    assert double._node is None and triple._node is None


class ReturnsNumpyScalar(tm.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum()        # NumPy returns np.float64 here, not an array

    @staticmethod
    def backward(ctx, grad):
        return np.ones(ctx.shape) * grad


def test_numpy_scalar_output_becomes_a_0d_tensor():
    x = leaf([1.0, 2.0])
    out = ReturnsNumpyScalar.apply(x)
    assert isinstance(out, tm.Tensor) and out.shape == () and out.item() == 3.0
    assert isinstance(out.data, np.ndarray)
    out.backward()
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


# ----- devices -----------------------------------------------------------------------------------------------
class PretendCudaTensor(tm.Tensor):
    """A CPU tensor that reports device 'cuda': enough to exercise apply's device check without a GPU."""

    @property
    def device(self):
        return "cuda"


def test_inputs_on_different_devices_raise_naming_both():
    cpu = leaf([1.0, 2.0])
    gpu = PretendCudaTensor(np.array([3.0, 4.0]), requires_grad=True)
    assert gpu.device == "cuda"
    with pytest.raises(tm.DeviceMismatchError) as info:
        Probe.apply(cpu, 1.0, gpu)
    message = str(info.value)
    assert "'cpu'" in message and "'cuda'" in message and "Probe" in message
    with pytest.raises(tm.DeviceMismatchError, match="'cuda'.*'cpu'"):
        Probe.apply(gpu, 1.0, cpu)


def test_operators_mixing_devices_raise_device_mismatch():
    cpu = leaf([1.0, 2.0])
    gpu = PretendCudaTensor(np.array([3.0, 4.0]))
    for combine in (lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a @ b, lambda a, b: b - a):
        with pytest.raises(tm.DeviceMismatchError, match="cpu"):
            combine(cpu, gpu)


def test_device_mismatch_is_a_value_error():
    assert issubclass(tm.DeviceMismatchError, ValueError)


@pytest.mark.cuda
@pytest.mark.skipif(not tm.cuda_available(), reason="needs CuPy and a CUDA device")
def test_real_cpu_and_cuda_tensors_do_not_mix():
    cpu = tm.tensor([1.0, 2.0])
    gpu = cpu.to("cuda")
    with pytest.raises(tm.DeviceMismatchError, match="'cpu'.*'cuda'"):
        cpu + gpu
