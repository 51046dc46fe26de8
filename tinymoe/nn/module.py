"""`Module`: parameters, buffers and sub-modules registered by attribute, like torch.nn.Module.

    class Block(Module):
        def __init__(self):
            super().__init__()
            self.proj = Linear(8, 8)                      # sub-module: its parameters appear as "proj.weight"
            self.scale = Parameter(np.ones(8, "float32")) # parameter
            self.register_buffer("steps", np.zeros(1))    # state that is saved but not trained
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..engine.backend import device_of, normalize_device, normalize_dtype, to_device, to_numpy
from ..engine.checks import require_bool, require_finite_array
from ..engine.tensor import Tensor, tensor


class Parameter(Tensor):
    """A leaf Tensor that a Module trains (requires_grad=True unless told otherwise)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        source = data if isinstance(data, Tensor) else tensor(data)
        super().__init__(source.data, requires_grad=requires_grad)


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ----- registration ------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        """Registers Parameters, Modules and (by name) buffers. A Parameter holding NaN or inf, or a buffer
        holding NaN, raises FloatingPointError naming the attribute (buffers may hold ±inf: masks)."""
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            require_finite_array(value, name, type(self).__name__, allow_inf=True)
            self._buffers[name] = value
            return
        if isinstance(value, Parameter):
            require_finite_array(value.data, name, type(self).__name__)
        for registry in (self._parameters, self._modules, self._buffers):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        for registry in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(registry)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def register_buffer(self, name: str, array) -> None:
        """State saved in state_dict() and moved by to(), but not trained: a plain array."""
        self._buffers[name] = array

    # ----- traversal ---------------------------------------------------------------------------------
    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) pairs, each parameter once even if it is shared."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, parameter in module._parameters.items():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield (f"{module_name}.{name}" if module_name else name), parameter

    def parameters(self):
        return [parameter for _, parameter in self.named_parameters()]

    def named_buffers(self):
        for module_name, module in self.named_modules():
            for name, buffer in module._buffers.items():
                yield (f"{module_name}.{name}" if module_name else name), buffer

    # ----- modes, devices, gradients -----------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        mode = require_bool(mode, "mode", f"{type(self).__name__}.train")
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def to(self, device=None, dtype=None) -> "Module":
        """Move (and/or cast) every parameter and floating buffer in place; optimizers keep their references."""
        device = None if device is None else normalize_device(device)
        for _, module in self.named_modules():
            for parameter in module._parameters.values():
                target = device or parameter.device
                parameter.data = _moved(parameter.data, target, dtype)
                parameter.grad = None if parameter.grad is None else _moved(parameter.grad, target, dtype)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    floating = getattr(buffer, "dtype", np.dtype(object)).kind == "f"
                    module._buffers[name] = _moved(buffer, device or device_of(buffer), dtype if floating else None)
        self.parameters_replaced()
        return self

    def parameters_replaced(self) -> None:
        """Tell every module that parameter arrays were replaced (`.data = ...`), so that one which lays its
        parameters out in a particular way (tinymoe.nn.Experts: w1 and w3 as halves of one array) can do so
        again. `to()`, `load_state_dict()` and tinymoe's checkpoint loaders call it; code that assigns
        `.data` itself may (results are the same without it, only slower)."""
        for _, module in self.named_modules():
            module._arrange_parameters()

    def _arrange_parameters(self) -> None:
        """Re-establish this module's parameter layout after `parameters_replaced()`; nothing by default."""

    @property
    def device(self) -> str:
        parameters = self.parameters()
        return parameters[0].device if parameters else "cpu"

    def num_parameters(self) -> int:
        return sum(parameter.size for parameter in self.parameters())

    # ----- state -------------------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Every parameter and buffer by dotted name, as NumPy copies."""
        state = OrderedDict()
        for module_name, module in self.named_modules():
            for name, value in list(module._parameters.items()) + list(module._buffers.items()):
                if value is not None:
                    data = value.data if isinstance(value, Tensor) else value
                    state[f"{module_name}.{name}" if module_name else name] = np.array(to_numpy(data), copy=True)
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays into parameters and buffers (cast to their dtype, moved to their device).

        Raises KeyError naming every missing or unexpected key (strict), ValueError naming mis-shaped ones,
        FloatingPointError naming a parameter holding NaN or inf (or a buffer holding NaN); nothing is changed
        unless every key checks out.
        """
        strict = require_bool(strict, "strict", "load_state_dict")
        targets = OrderedDict()
        for module_name, module in self.named_modules():
            for name in list(module._parameters) + list(module._buffers):
                targets[f"{module_name}.{name}" if module_name else name] = (module, name)
        missing = [key for key in targets if key not in state]
        unexpected = [key for key in state if key not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        mismatched = []
        for key, (module, name) in targets.items():
            if key in state:
                current = module._parameters.get(name, module._buffers.get(name))
                current_shape = tuple(current.shape) if current is not None else None
                if current_shape is not None and tuple(np.shape(state[key])) != current_shape:
                    mismatched.append(f"{key}: checkpoint {tuple(np.shape(state[key]))} vs model {current_shape}")
        if mismatched:
            raise ValueError("load_state_dict: shape mismatch for " + "; ".join(mismatched))
        for key, (module, name) in targets.items():
            if key in state:
                require_finite_array(state[key], repr(key), "load_state_dict", allow_inf=name in module._buffers)
        for key, (module, name) in targets.items():
            if key not in state:
                continue
            array = np.asarray(to_numpy(state[key]))
            if name in module._parameters:
                parameter = module._parameters[name]
                parameter.data = to_device(array.astype(parameter.dtype, copy=True), parameter.device)
                parameter.grad = None
            else:
                old = module._buffers[name]
                dtype = old.dtype if old is not None else array.dtype
                module._buffers[name] = to_device(array.astype(dtype, copy=True), device_of(old) if old is not None else "cpu")
        self.parameters_replaced()

    # ----- calling -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


def _moved(array, device, dtype):
    if dtype is not None:
        dtype = normalize_dtype(dtype, device)
        if array.dtype != dtype:
            array = array.astype(dtype)
    return to_device(array, device)


class ModuleList(Module):
    """A list of sub-modules, registered as "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Applies its modules in order: Sequential(a, b)(x) == b(a(x))."""

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for module in self:
            x = module(x)
        return x
