"""`Function`: how every op is written — a forward on raw arrays and a hand-written backward beside it.

    class Cube(Function):
        @staticmethod
        def forward(ctx, x):          # x is an array of the input's module; ctx.xp is that module
            ctx.save_for_backward(x)
            return x ** 3
        @staticmethod
        def backward(ctx, grad):      # one gradient per tensor input, None where there is none
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * grad

    y = Cube.apply(t)

`apply` unwraps Tensor arguments to arrays (other arguments pass through unchanged), checks that every
tensor is on one device, runs `forward`, wraps its floating outputs as Tensors and, when a gradient is
wanted, records a graph node. `forward` may return one array or a tuple; floating arrays become Tensors
(differentiable, and `backward` receives one gradient for each of them, in order), anything else (integer
indices, Python values) is returned as it is.
"""
from __future__ import annotations

import numpy as np

from .autograd import Node, is_grad_enabled
from .backend import array_module
from .tensor import Tensor


class DeviceMismatchError(ValueError):
    """Tensors on different devices were given to one op."""


class Context:
    """Per-call scratch space shared by one forward and its backward.

    `xp`: the array module of the inputs. `needs_input_grad`: one bool per tensor input.
    `requires_grad`: True when a backward may follow; forwards can skip backward-only work when it is False.
    Attributes set on the context (`ctx.axis = axis`) are kept for backward, like saved arrays.
    `last_use`: True while a backward runs that is the last to read the saved arrays (`backward()` without
    retain_graph); a backward may then overwrite buffers that its own forward made and saved (never inputs).
    """

    def __init__(self, xp, needs_input_grad, requires_grad):
        self.xp = xp
        self.needs_input_grad = needs_input_grad
        self.requires_grad = requires_grad
        self.saved_tensors = ()
        self.last_use = False

    def save_for_backward(self, *arrays):
        """Keep arrays for backward; under no_grad (or with no differentiable input) nothing is kept."""
        if self.requires_grad:
            self.saved_tensors = arrays


class Function:
    """Base class of every op. Subclasses define static `forward(ctx, ...)` and `backward(ctx, *grads)`.

    `fresh_gradients = True` promises that backward returns newly allocated arrays, a different one per
    input, kept nowhere else (disjoint views of one new buffer qualify: SwiGLUExperts returns w1's and w3's
    gradients as the two halves of one array); a leaf's `.grad` then takes them as they are instead of a copy.
    `gradient_views = True` (one tensor input only) promises that backward returns its incoming gradient or a
    view of it (Reshape): when the engine owns that gradient, it owns the view too and need not copy it.
    """

    fresh_gradients = False
    gradient_views = False

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        # Called for every op of every step: one pass over the arguments, outputs wrapped without re-checks.
        tensors, raw_args = [], []
        for arg in args:
            if isinstance(arg, Tensor):
                tensors.append(arg)
                raw_args.append(arg.data)
            else:
                raw_args.append(arg)
        if not tensors:
            raise TypeError(f"{cls.__name__}.apply needs at least one Tensor argument")
        for name, value in kwargs.items():
            if isinstance(value, Tensor):
                raise TypeError(f"{cls.__name__}.apply: keyword argument {name!r} is a Tensor; pass tensors positionally")
        if len(tensors) > 1:
            _check_one_device(cls, tensors)
        needs_input_grad = tuple([tensor.requires_grad for tensor in tensors])
        record = True in needs_input_grad and is_grad_enabled()
        ctx = Context(array_module(tensors[0].data), needs_input_grad, record)

        result = cls.forward(ctx, *raw_args, **kwargs)

        single = not isinstance(result, tuple)
        items = (result,) if single else result
        wrapped, differentiable = [], []
        for item in items:
            if isinstance(item, np.generic) and item.dtype.kind == "f":
                item = np.asarray(item)  # NumPy reductions return scalars; a Tensor holds an ndarray
            if _is_float_array(item):
                tensor = Tensor._wrap(item, record)
                differentiable.append(tensor)
                wrapped.append(tensor)
            else:
                wrapped.append(item)
        if record and differentiable:
            node = Node(cls, ctx, tensors, differentiable)
            for index, tensor in enumerate(differentiable):
                tensor._node = node
                tensor._output_index = index
        return wrapped[0] if single else tuple(wrapped)


def _check_one_device(cls, tensors) -> None:
    device = tensors[0].device
    for position, tensor in enumerate(tensors[1:], start=1):
        if tensor.device != device:
            raise DeviceMismatchError(
                f"{cls.__name__}: tensor input 0 is on {device!r} but tensor input {position} is on "
                f"{tensor.device!r}; move them to one device with .to()"
            )


def _is_float_array(value) -> bool:
    if type(value) is np.ndarray:
        return value.dtype.kind == "f"
    dtype = getattr(value, "dtype", None)
    return dtype is not None and hasattr(value, "shape") and dtype.kind == "f"
