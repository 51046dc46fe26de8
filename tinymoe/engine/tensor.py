"""`Tensor`: an ndarray of its backend (NumPy or CuPy) plus what reverse-mode differentiation needs.

Where the operators come from. `x + y`, `x @ w`, `x[i]`, `x.sum()`, `x.astype()` ... are Functions written in
engine/basic_ops.py, each forward beside its backward. basic_ops imports Function and Function imports Tensor
(it wraps every output in one), so this module must not import basic_ops: that would be a circle. Instead
each operator calls its op through the class attribute `Tensor._ops` (`self._ops.Add.apply(self, other)`),
which `tinymoe/engine/__init__.py`, sitting above both, fills once with `bind_ops(basic_ops)`. Importing any
tinymoe module runs that `__init__` first, so the table is filled before a tensor can exist. The engine's
imports form a tree: backend <- autograd, conversion <- tensor <- function <- checks <- basic_ops <- __init__.

One dtype rule for the whole engine. A tensor holds float32 or float64 data (float16 on CUDA); comparisons
give bool tensors, used as masks; tinymoe.tensor() converts integer data to float (indices travel as plain
integer arrays), and a Tensor holding integers that slipped past it is refused by every operator. An op on two or more Tensors of different floating dtypes (float32 with
float64, in +, *, @, where, a loss, a norm, concatenate, ...) raises a TypeError naming the op and both dtypes:
cast one with .astype(); nothing is promoted silently. Python numbers, NumPy scalars and plain arrays are
constants that take the tensor's dtype (`x * 0.5` and `x + np.ones(3)` stay float32 for a float32 x). A bool
mask may meet a float tensor in arithmetic (`x * (x > 0)`): it never widens the result, which keeps the float
tensor's dtype. Comparisons accept any mix (they carry no gradient).
"""
from __future__ import annotations

import numbers

import numpy as np

from . import autograd
from .backend import array_module, device_of, normalize_device, normalize_dtype, to_device, to_numpy
from .conversion import as_tensor_array, require_bool


class _OpsNotBound:
    """Stands in for `Tensor._ops` until engine/__init__.py binds the ops module (a partial import)."""

    def __getattr__(self, name):
        raise RuntimeError(f"Tensor operators are not bound yet (wanted {name}); import tinymoe.engine first")


class Tensor:
    """A floating array (or a bool mask, from a comparison) that can record the ops applied to it.

    `.data`: the ndarray (numpy.ndarray on "cpu", cupy.ndarray on "cuda"). `.grad`: an array of the same
    shape and module once `backward()` has reached this tensor (leaf tensors only, or after
    `retain_grad()`), else None. Operators broadcast like NumPy and un-broadcast in backward; operands follow
    the dtype rule of the module docstring.
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "_output_index", "_retains_grad", "__weakref__")
    __array_priority__ = 1000  # ndarray <op> Tensor defers to Tensor's reflected operator
    __hash__ = object.__hash__  # __eq__ is elementwise; tensors still work as dict keys by identity
    _ops = _OpsNotBound()  # engine.basic_ops once bind_ops() has run (see the module docstring)

    def __init__(self, data, requires_grad: bool = False):
        # Internal constructor: `data` must already be an array of a supported dtype. Use tinymoe.tensor().
        if not (hasattr(data, "dtype") and hasattr(data, "shape")):
            raise TypeError(f"Tensor(data): data must be a NumPy or CuPy array, got {type(data).__name__}; "
                            "use tinymoe.tensor() to convert lists and numbers")
        self.data = data
        self.grad = None
        self.requires_grad = require_bool(requires_grad, "requires_grad", "Tensor")
        self._node = None
        self._output_index = 0
        self._retains_grad = False

    @classmethod
    def _wrap(cls, data, requires_grad: bool) -> "Tensor":
        """Internal, for Function.apply's outputs: `data` a floating array, `requires_grad` a bool (unchecked)."""
        tensor = object.__new__(cls)
        tensor.data, tensor.grad, tensor.requires_grad = data, None, requires_grad
        tensor._node, tensor._output_index, tensor._retains_grad = None, 0, False
        return tensor

    # ----- description -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def device(self) -> str:
        return device_of(self.data)

    @property
    def xp(self):
        """The array module of `.data`: numpy or cupy."""
        return array_module(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        device = ", device='cuda'" if self.device == "cuda" else ""
        body = np.array2string(to_numpy(self.data), precision=4, separator=", ", threshold=20, edgeitems=2)
        return f"tensor({body}, dtype={self.dtype.name}{device}{grad})"

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous; use .item()")
        return bool(self.data.reshape(()))

    # ----- conversion --------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (a copy from the GPU; the array itself on the CPU)."""
        return to_numpy(self.data)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return float(self.data.reshape(()))

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    def to(self, device) -> "Tensor":
        """A copy on `device` ("cpu" or "cuda"), or this tensor when it is already there.

        The copy is a new leaf: gradients do not flow back across devices.
        """
        device = normalize_device(device)
        if device == self.device:
            return self
        if device == "cpu" and self.dtype == np.float16:
            raise TypeError("float16 tensors live only on 'cuda'; call .astype('float32') before .to('cpu')")
        return Tensor(to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype) -> "Tensor":
        """Differentiable cast to another floating dtype."""
        dtype = normalize_dtype(dtype, self.device)
        return self if dtype == self.dtype else self._ops.Cast.apply(self, dtype)

    # ----- autograd ----------------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate gradients of this tensor into every leaf that requires them.

        `grad` (same shape) is the cotangent; it may be omitted only for a one-element tensor.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input has requires_grad=True)")
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a grad needs a one-element tensor, got shape {self.shape}")
            grad = xp.ones(self.shape, dtype=self.dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad)
            if grad.shape != self.data.shape:
                raise ValueError(f"backward(grad): grad has shape {grad.shape}, expected {self.shape}")
            if array_module(grad) is not xp:
                raise ValueError(f"backward(grad): grad is on {device_of(grad)!r}, the tensor on {self.device!r}")
            grad = grad.astype(self.dtype, copy=False)
        autograd.backward(self, grad, retain_graph=retain_graph)

    def retain_grad(self) -> "Tensor":
        """Also fill `.grad` of this non-leaf tensor during backward."""
        self._retains_grad = True
        return self

    def zero_grad(self) -> None:
        self.grad = None

    # ----- arithmetic (each op is a Function in basic_ops.py, reached through Tensor._ops) -------------
    def _operand(self, other, op: str) -> "Tensor":
        """`other` as a Tensor; constants take this tensor's float dtype (float32 next to a boolean mask);
        a Tensor of another floating dtype is refused (the dtype rule)."""
        for operand in (self, other):
            if isinstance(operand, Tensor) and operand.dtype.kind not in "fb":
                raise TypeError(f"{op}: a Tensor holding {operand.dtype} data cannot take part in arithmetic; "
                                "make it with tinymoe.tensor(), which converts integers to float")
        if isinstance(other, Tensor):
            if other.dtype != self.dtype and other.dtype.kind == "f" and self.dtype.kind == "f":
                raise TypeError(
                    f"{op}: a {self.dtype.name} tensor cannot be combined with a {other.dtype.name} tensor "
                    "(tinymoe never promotes silently); cast one of them with .astype()"
                )
            return other
        dtype = self.dtype if self.dtype.kind == "f" else np.dtype(np.float32)
        if isinstance(other, (numbers.Number, np.generic)):
            return Tensor(self.xp.asarray(other, dtype=dtype))
        if device_of(other) != self.device:
            raise ValueError(f"an array on {device_of(other)!r} cannot be combined with a tensor on {self.device!r}")
        return Tensor(self.xp.asarray(other).astype(dtype, copy=False))

    def __add__(self, other):
        return self._ops.Add.apply(self, self._operand(other, "add"))

    def __radd__(self, other):
        return self._ops.Add.apply(self._operand(other, "add"), self)

    def __sub__(self, other):
        return self._ops.Sub.apply(self, self._operand(other, "sub"))

    def __rsub__(self, other):
        return self._ops.Sub.apply(self._operand(other, "sub"), self)

    def __mul__(self, other):
        return self._ops.Mul.apply(self, self._operand(other, "mul"))

    def __rmul__(self, other):
        return self._ops.Mul.apply(self._operand(other, "mul"), self)

    def __truediv__(self, other):
        return self._ops.Div.apply(self, self._operand(other, "div"))

    def __rtruediv__(self, other):
        return self._ops.Div.apply(self._operand(other, "div"), self)

    def __pow__(self, exponent):
        return self._ops.Pow.apply(self, self._operand(exponent, "pow"))

    def __rpow__(self, base):
        return self._ops.Pow.apply(self._operand(base, "pow"), self)

    def __matmul__(self, other):
        return self._ops.MatMul.apply(self, self._operand(other, "matmul"))

    def __rmatmul__(self, other):
        return self._ops.MatMul.apply(self._operand(other, "matmul"), self)

    def __neg__(self):
        return self._ops.Neg.apply(self)

    def __getitem__(self, index):
        return self._ops.GetItem.apply(self, _raw_index(index))

    # comparisons: no gradient; the result is a boolean tensor usable as a mask or in where()
    def _compare(self, other, compare):
        other_data = other.data if isinstance(other, Tensor) else other
        return Tensor(compare(self.data, other_data))

    def __lt__(self, other):
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other):
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other):
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other):
        return self._compare(other, lambda a, b: a >= b)

    def __eq__(self, other):
        return self._compare(other, lambda a, b: a == b)

    def __ne__(self, other):
        return self._compare(other, lambda a, b: a != b)

    # ----- reductions and shape ----------------------------------------------------------------------
    def sum(self, axis=None, keepdims: bool = False):
        return self._ops.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return self._ops.Mean.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False):
        return self._ops.Max.apply(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self._ops.Reshape.apply(self, tuple(int(size) for size in shape))

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return self._ops.Transpose.apply(self, tuple(axes) if axes else None)

    @property
    def T(self):
        return self.transpose()


def _raw_index(index):
    """Tensors inside an index (boolean masks) are used by their data; they carry no gradient."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(part.data if isinstance(part, Tensor) else part for part in index)
    return index


def tensor(data, requires_grad: bool = False, dtype=None, device=None) -> Tensor:
    """Make a leaf Tensor holding a copy of `data` (nested lists, scalars, NumPy or CuPy arrays, a Tensor).

    dtype: float32 by default; a floating array keeps its own dtype (float64 stays float64). device: where
    `data` lives by default. Strings, complex numbers, None and other objects raise TypeError; a finite value
    that overflows `dtype` raises OverflowError (see engine/conversion.py).
    """
    requires_grad = require_bool(requires_grad, "requires_grad", "tensor")
    if isinstance(data, Tensor):
        data = data.data
    device = device_of(data) if device is None else normalize_device(device)
    return Tensor(as_tensor_array(data, dtype, device, op="tensor"), requires_grad=requires_grad)


def bind_ops(ops) -> None:
    """Give Tensor's operators their ops (the module engine/basic_ops.py); engine/__init__.py calls this once."""
    Tensor._ops = ops
