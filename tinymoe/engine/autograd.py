"""Reverse-mode differentiation over the graph that `Function.apply` records.

Each application of a Function with a differentiable input records one `Node`. `backward(root)` visits the
nodes reachable from `root` in reverse topological order (an explicit stack, so graph depth is not limited by
Python's recursion limit), calls each Function's hand-written `backward`, and sums the gradients that reach a
tensor from several uses. Leaf tensors (those made by the user, `requires_grad=True`) collect them in `.grad`.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

from .backend import array_module

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


class no_grad:
    """Context manager (and decorator): no graph is recorded and nothing is saved for backward inside it."""

    def __enter__(self):
        self._previous = is_grad_enabled()
        _state.grad_enabled = False
        return self

    def __exit__(self, *exc_info):
        _state.grad_enabled = self._previous
        return False

    def __call__(self, function):
        def wrapper(*args, **kwargs):
            with no_grad():
                return function(*args, **kwargs)

        wrapper.__name__ = getattr(function, "__name__", "wrapper")
        wrapper.__doc__ = getattr(function, "__doc__", None)
        return wrapper


class Edge:
    """Where an input's gradient goes: a leaf tensor's `.grad`, or output `index` of the node that made it.

    Edges keep no reference to non-leaf input tensors, so an activation is freed as soon as neither the
    program nor a saved context needs it (a Node holding its input Tensors would keep them all alive).
    """

    __slots__ = ("leaf", "node", "index", "shape", "dtype")

    def __init__(self, tensor):
        node = tensor._node
        self.leaf = tensor if node is None else None
        self.node, self.index = node, tensor._output_index
        data = tensor.data
        self.shape, self.dtype = tuple(data.shape), data.dtype


class Node:
    """One recorded op: the Function class, its context, an Edge per tensor input (None where no gradient
    is wanted), and the shapes and dtypes of its differentiable outputs."""

    __slots__ = ("function", "ctx", "edges", "output_meta", "outputs", "freed")

    def __init__(self, function, ctx, inputs, outputs):
        self.function = function
        self.ctx = ctx
        self.edges = tuple(Edge(tensor) if tensor.requires_grad else None for tensor in inputs)
        self.output_meta = tuple([(tuple(out.data.shape), out.data.dtype) for out in outputs])
        self.outputs = tuple(weakref.ref(out) for out in outputs)  # weak: only for retain_grad()
        self.freed = False


def _nodes_in_topological_order(root_node):
    """Nodes reachable from `root_node`, each listed after every node that produced one of its inputs."""
    order, visited = [], set()
    stack = [(root_node, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for edge in node.edges:
            if edge is not None and edge.node is not None and id(edge.node) not in visited:
                stack.append((edge.node, False))
    return order


def _accumulate_leaf(tensor, grad, owned=False, written=None):
    """Add `grad` into tensor.grad. Unless `owned`, copy: a backward may return the same array for two inputs,
    or a read-only broadcast view. `written`: ids of the tensors whose .grad this backward() made (a set it
    updates); only those are added into in place (a .grad from before may be held by the caller)."""
    xp = array_module(grad)
    owned = owned and _is_array(grad)  # a 0-d op may return a NumPy scalar: not an array to write into
    if tensor.grad is None:
        tensor.grad = grad if owned else xp.array(grad, dtype=tensor.dtype, copy=True)
    elif getattr(tensor.grad, "dtype", None) != grad.dtype or tensor.grad.shape != grad.shape:
        tensor.grad = xp.asarray(tensor.grad + grad)  # a .grad the caller set, of another dtype or shape
    elif written is not None and id(tensor) in written:
        xp.add(tensor.grad, grad, out=tensor.grad)
    elif owned:
        tensor.grad = xp.add(grad, tensor.grad, out=grad)  # a + b and b + a are the same bits (grad: an array)
    else:
        tensor.grad = xp.asarray(tensor.grad + grad)
    if written is not None:
        written.add(id(tensor))


def _add_pending(pending, owned, edge, grad, grad_is_owned):
    """Sum `grad` into the pending gradient of edge.node's output edge.index, in place where the engine owns one
    of the two (owned: (id(node), index) -> whether that pending array may be written into)."""
    slots = pending.setdefault(id(edge.node), [None] * len(edge.node.output_meta))
    key = (id(edge.node), edge.index)
    previous = slots[edge.index]
    grad_is_owned = grad_is_owned and _is_array(grad)
    if previous is None:
        slots[edge.index], owned[key] = grad, grad_is_owned
    elif owned.get(key):
        array_module(previous).add(previous, grad, out=previous)
    elif grad_is_owned:
        slots[edge.index], owned[key] = array_module(grad).add(grad, previous, out=grad), True
    else:
        total = previous + grad  # a NumPy scalar when both are 0-d
        slots[edge.index], owned[key] = total, _is_array(total)


def _is_array(value) -> bool:
    """Whether `value` is an array of its module (NumPy or CuPy), not a NumPy scalar."""
    return isinstance(value, array_module(value).ndarray)


def backward(root, grad, retain_graph: bool = False):
    """Accumulate d(root)/d(leaf), contracted with `grad`, into every leaf's `.grad`."""
    if root._node is None:
        if root.requires_grad:
            _accumulate_leaf(root, grad)
        return
    pending = {id(root._node): [None] * len(root._node.output_meta)}
    pending[id(root._node)][root._output_index] = grad
    owned, written = {}, set()  # pending arrays the engine may write into; leaves whose .grad this call made

    for node in reversed(_nodes_in_topological_order(root._node)):
        output_grads = pending.pop(id(node), None)
        if output_grads is None:
            continue  # no gradient reached this node
        if node.freed:
            raise RuntimeError(
                f"backward() ran through {node.function.__name__} a second time, but its saved arrays were freed "
                "by the first backward() (or used up by one that failed part-way); call the first one with "
                "retain_graph=True"
            )
        xp = node.ctx.xp
        incoming_owned = True
        for index, (shape, dtype) in enumerate(node.output_meta):
            if output_grads[index] is None:
                output_grads[index] = xp.zeros(shape, dtype=dtype)
            else:
                incoming_owned = owned.pop((id(node), index), False) and incoming_owned
            output_tensor = node.outputs[index]()
            if output_tensor is not None and output_tensor._retains_grad:
                _accumulate_leaf(output_tensor, output_grads[index])

        node.ctx.last_use = not retain_graph
        node.freed = not retain_graph  # before the call: a backward that fails part-way may have consumed them
        input_grads = node.function.backward(node.ctx, *output_grads)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        if len(input_grads) != len(node.edges):
            raise RuntimeError(
                f"{node.function.__name__}.backward returned {len(input_grads)} gradient(s) "
                f"for {len(node.edges)} tensor input(s)"
            )
        # A view of gradients the engine owns is owned too when it is the only one handed on (one input).
        views_owned = node.function.gradient_views and incoming_owned and len(node.edges) == 1
        for position, (edge, input_grad) in enumerate(zip(node.edges, input_grads)):
            if input_grad is None or edge is None:
                continue
            checked = _checked_gradient(node, position, edge, input_grad)
            fresh = node.function.fresh_gradients or views_owned or checked is not input_grad  # a cast copies too
            if edge.leaf is not None:
                _accumulate_leaf(edge.leaf, checked, fresh, written)
            else:
                _add_pending(pending, owned, edge, checked, fresh)
        if not retain_graph:
            node.ctx, node.edges = None, ()  # drop the saved arrays and the links to the rest of the graph


def _checked_gradient(node, position, edge, grad):
    xp = node.ctx.xp
    same_module = (xp is np) if type(grad) is np.ndarray else array_module(grad) is xp  # the common case first
    if not same_module or getattr(grad, "shape", None) != edge.shape:
        got = getattr(grad, "shape", type(grad).__name__)
        raise RuntimeError(
            f"{node.function.__name__}.backward returned a gradient of shape {got} for input {position} "
            f"of shape {edge.shape}; it must match the input's shape and array module"
        )
    if grad.dtype != edge.dtype:
        grad = grad.astype(edge.dtype)
    return grad
