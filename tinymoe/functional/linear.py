"""linear (x @ weight.T + bias, torch's weight layout) and matmul (batched, broadcast)."""
from __future__ import annotations

import numpy as np

from ..engine.function import Function
from ..engine.tensor import Tensor
from ..engine.checks import require_same_dtype, require_tensor
from ..kernels.cpu_threads import MIN_PARALLEL_ELEMENTS, blas_controller, one_thread_blas, run_all


class Linear(Function):
    """y = x @ Wᵀ + b;  x (..., in), W (out, in), b (out,) or None -> y (..., out)

    dx = g @ W;  dW = Σ_rows gᵀ x (rows: every leading index of x);  db = Σ_rows g
    """

    # Leading axes are flattened so that each product is one 2-D GEMM (NumPy loops over stacked matrices).
    fresh_gradients = True

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.reshape(-1, x.shape[-1])
        y = _small_product(lambda: rows @ weight.T, weight, rows).reshape(*x.shape[:-1], weight.shape[0])
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        out_features, in_features = weight.shape
        grad_rows = grad.reshape(-1, out_features)
        rows = x.reshape(-1, in_features)
        side_by_side = _is_small(weight, rows) and rows.size >= MIN_PARALLEL_ELEMENTS and blas_controller()
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and side_by_side:
            grad_x, grad_weight = _small_products_side_by_side(grad_rows, weight, rows)
            grad_x = grad_x.reshape(x.shape)
        else:
            grad_x = _rows_times_weight(grad_rows, weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
            grad_weight = _small_product(lambda: grad_rows.T @ rows, weight, rows) if ctx.needs_input_grad[1] else None
        if not ctx.has_bias:
            return grad_x, grad_weight
        grad_bias = grad_rows.sum(axis=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


# A router's products have one tiny side (E experts, often 8): x @ Wᵀ (4096, 512)·(512, 8), gᵀ x and g W.
# Split over OpenBLAS's threads they take 0.4 ms on an idle 2-core machine but 4-120 ms (median) when other
# processes or spinning threads hold a core, as every call waits for its slowest thread; on one thread they
# take 0.7-0.9 ms every time (perf/prototype_linear.py). So on NumPy arrays, when W has at most
# SMALL_INNER_DIMENSION rows, they run with one-thread BLAS (threadpoolctl; the sums' order is BLAS's own,
# fixed, so results do not change run to run). The backward's two run side by side, one per thread of the
# kernels' pool (threads that wait on a lock: with a core taken, the pair takes at most the two in turn), for
# inputs of MIN_PARALLEL_ELEMENTS or more (below, waking a thread costs more than it saves).
# Without threadpoolctl, dx = g W uses NumPy's einsum loops (single-threaded, ~1.6 ms) and the others plain BLAS.
SMALL_INNER_DIMENSION = 16


def _is_small(weight, rows) -> bool:
    return isinstance(rows, np.ndarray) and weight.shape[0] <= SMALL_INNER_DIMENSION and rows.shape[0] > 1


def _small_product(product, weight, rows):
    """product() on one BLAS thread when W is small (see above), else as is."""
    return one_thread_blas(product) if _is_small(weight, rows) else product()


def _rows_times_weight(grad_rows, weight):
    """grad_rows (N, out) @ weight (out, in) -> (N, in), on one BLAS thread (or einsum) when `out` is tiny."""
    if not _is_small(weight, grad_rows):
        return grad_rows @ weight
    if blas_controller() is None:
        return np.einsum("no,oi->ni", grad_rows, weight)
    return one_thread_blas(lambda: grad_rows @ weight)


def _small_products_side_by_side(grad_rows, weight, rows):
    """(g W, gᵀ x) of a small W, one product per pool thread, each on one BLAS thread as when alone (the same
    bits): 1.1 instead of 1.9 ms for a (4096, 512) input and 8 rows of W on two cores."""
    products = (lambda: grad_rows @ weight, lambda: grad_rows.T @ rows)
    return one_thread_blas(lambda: run_all(lambda product: product(), products))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias.  x (..., in), weight (out, in), bias (out,) or None -> (..., out)."""
    require_tensor(x, "x", "linear")
    require_tensor(weight, "weight", "linear")
    if x.ndim == 0:
        raise ValueError("linear: x is 0-d; it must have shape (..., in_features)")
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"linear: weight has shape {weight.shape} but x of shape {x.shape} needs weight of shape "
            f"(out_features, {x.shape[-1]})"
        )
    require_same_dtype("linear", x=x, weight=weight)
    if bias is not None:
        require_tensor(bias, "bias", "linear")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: bias has shape {bias.shape}, expected ({weight.shape[0]},) to match weight")
        require_same_dtype("linear", x=x, bias=bias)
    return Linear.apply(x, weight, bias)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """NumPy matmul a @ b: batch axes broadcast, 1-D operands promoted to a row / column and squeezed after.

    Gradients (Tensor's MatMul): da = g @ bᵀ, db = aᵀ @ g, un-broadcast over the batch axes.
    """
    require_tensor(a, "a", "matmul")
    require_tensor(b, "b", "matmul")
    for name, operand in (("a", a), ("b", b)):
        if operand.ndim == 0:
            raise ValueError(f"matmul: {name} is 0-d; matmul needs at least one axis (use * for scalars)")
    contracted_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != contracted_b:
        raise ValueError(
            f"matmul: a has shape {a.shape} and b has shape {b.shape}; a's last axis ({a.shape[-1]}) must equal "
            f"b's {'only' if b.ndim == 1 else 'second-to-last'} axis ({contracted_b})"
        )
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(
            f"matmul: the batch axes of a {a.shape[:-2]} and b {b.shape[:-2]} do not broadcast"
        ) from None
    require_same_dtype("matmul", a=a, b=b)
    return a @ b
