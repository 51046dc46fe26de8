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


def _accumulate_leaf(tensor, grad, owned=False):
    # Unless `owned`, copy: a backward may return the same array for two inputs, or a read-only broadcast view.
    xp = array_module(grad)
    if tensor.grad is None:
        tensor.grad = grad if owned else xp.array(grad, dtype=tensor.dtype, copy=True)
    else:
        tensor.grad = xp.asarray(tensor.grad + grad)


def backward(root, grad, retain_graph: bool = False):
    """Accumulate d(root)/d(leaf), contracted with `grad`, into every leaf's `.grad`."""
    if root._node is None:
        if root.requires_grad:
            _accumulate_leaf(root, grad)
        return
    pending = {id(root._node): [None] * len(root._node.output_meta)}
    pending[id(root._node)][root._output_index] = grad

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
        for index, (shape, dtype) in enumerate(node.output_meta):
            if output_grads[index] is None:
                output_grads[index] = xp.zeros(shape, dtype=dtype)
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
        for position, (edge, input_grad) in enumerate(zip(node.edges, input_grads)):
            if input_grad is None or edge is None:
                continue
            checked = _checked_gradient(node, position, edge, input_grad)
            if edge.leaf is not None:
                owned = node.function.fresh_gradients or checked is not input_grad  # a cast copies too
                _accumulate_leaf(edge.leaf, checked, owned)
            else:
                input_grad = checked
                slots = pending.setdefault(id(edge.node), [None] * len(edge.node.output_meta))
                previous = slots[edge.index]
                slots[edge.index] = input_grad if previous is None else previous + input_grad
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
