"""`Tensor`: an ndarray of its backend (NumPy or CuPy) plus what reverse-mode differentiation needs."""
from __future__ import annotations

import numbers

import numpy as np

from . import autograd
from .backend import array_module, device_of, module_for_device, normalize_device, normalize_dtype, to_device, to_numpy


class Tensor:
    """A floating array that can record the ops applied to it.

    `.data`: the ndarray (numpy.ndarray on "cpu", cupy.ndarray on "cuda"). `.grad`: an array of the same
    shape and module once `backward()` has reached this tensor (leaf tensors only, or after
    `retain_grad()`), else None. Operators broadcast like NumPy and un-broadcast in backward.
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "_output_index", "_retains_grad", "__weakref__")
    __array_priority__ = 1000  # ndarray <op> Tensor defers to Tensor's reflected operator
    __hash__ = object.__hash__  # __eq__ is elementwise; tensors still work as dict keys by identity

    def __init__(self, data, requires_grad: bool = False):
        # Internal constructor: `data` must already be an array of a supported dtype. Use tinymoe.tensor().
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None
        self._output_index = 0
        self._retains_grad = False

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
        return self if dtype == self.dtype else _ops.Cast.apply(self, dtype)

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

    # ----- arithmetic (each op is a Function in basic_ops.py) -----------------------------------------
    def _operand(self, other) -> "Tensor":
        """`other` as a Tensor; constants take this tensor's float dtype (float32 next to a boolean mask)."""
        if isinstance(other, Tensor):
            return other
        dtype = self.dtype if self.dtype.kind == "f" else np.dtype(np.float32)
        if isinstance(other, (numbers.Number, np.generic)):
            return Tensor(self.xp.asarray(other, dtype=dtype))
        if device_of(other) != self.device:
            raise ValueError(f"an array on {device_of(other)!r} cannot be combined with a tensor on {self.device!r}")
        return Tensor(self.xp.asarray(other).astype(dtype, copy=False))

    def __add__(self, other):
        return _ops.Add.apply(self, self._operand(other))

    def __radd__(self, other):
        return _ops.Add.apply(self._operand(other), self)

    def __sub__(self, other):
        return _ops.Sub.apply(self, self._operand(other))

    def __rsub__(self, other):
        return _ops.Sub.apply(self._operand(other), self)

    def __mul__(self, other):
        return _ops.Mul.apply(self, self._operand(other))

    def __rmul__(self, other):
        return _ops.Mul.apply(self._operand(other), self)

    def __truediv__(self, other):
        return _ops.Div.apply(self, self._operand(other))

    def __rtruediv__(self, other):
        return _ops.Div.apply(self._operand(other), self)

    def __pow__(self, exponent):
        return _ops.Pow.apply(self, self._operand(exponent))

    def __rpow__(self, base):
        return _ops.Pow.apply(self._operand(base), self)

    def __matmul__(self, other):
        return _ops.MatMul.apply(self, self._operand(other))

    def __rmatmul__(self, other):
        return _ops.MatMul.apply(self._operand(other), self)

    def __neg__(self):
        return _ops.Neg.apply(self)

    def __getitem__(self, index):
        return _ops.GetItem.apply(self, _raw_index(index))

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
        return _ops.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return _ops.Mean.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False):
        return _ops.Max.apply(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _ops.Reshape.apply(self, tuple(int(size) for size in shape))

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return _ops.Transpose.apply(self, tuple(axes) if axes else None)

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

    dtype: float32 by default; a floating array keeps its own dtype. device: where `data` lives by default.
    """
    if isinstance(data, Tensor):
        data = data.data
    source_device = device_of(data)
    device = source_device if device is None else normalize_device(device)
    if dtype is None:
        source_dtype = getattr(data, "dtype", None)
        dtype = source_dtype if source_dtype is not None and source_dtype.kind == "f" else np.float32
    dtype = normalize_dtype(dtype, device)
    try:
        host_or_device = data if source_device == device else to_device(data, device)
        xp = module_for_device(device)
        array = xp.array(host_or_device, dtype=dtype, copy=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"tensor(data): cannot make a {dtype.name} array of {type(data).__name__}: {error}") from None
    return Tensor(array, requires_grad=requires_grad)


from . import basic_ops as _ops  # noqa: E402  (basic_ops needs Tensor defined above)
