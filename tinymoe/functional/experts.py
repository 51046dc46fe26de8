"""Expert networks as ops: E feed-forward networks applied to the expert-sorted rows of a routing plan.

Rows [expert_offsets[e], expert_offsets[e+1]) of the dispatched buffer xs (M, d) belong to expert e, so each
expert is a few dense matmuls on one contiguous block (weights in torch layout: w1 (E, ff, d), w2 (E, d, ff)).

    SwiGLU (Shazeer 2020; Mixtral):  y = w2 · (silu(w1 · x) ⊙ (w3 · x))    swiglu_experts(xs, w1, w3, w2, offsets)
    MLP ("relu" | "gelu" | "silu"):   y = w2 · act(w1 · x + b1) + b2       mlp_experts(xs, w1, b1, w2, b2, offsets, act)

The public functions check shapes, dtypes and offsets; the `*_unchecked` entries take the same arguments and
check nothing (inputs trusted: they come from a RoutingPlan and an Experts module). The SwiGLU kernels are
looked up once in forward (`tinymoe.kernels`) and kept on `ctx` for backward. On the CPU, SwiGLU expert blocks
run over a pool of one thread per core, each with one-thread BLAS (`run_blocks`: what it changes and when),
and their large buffers come from `tinymoe.engine.workspace` (reused memory: no fresh pages every step).
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

from ..engine.array_math import ACTIVATIONS_WITH_DERIVATIVE
from ..engine.checks import describe, require_same_dtype, require_tensor
from ..engine import workspace
from ..engine.function import Function
from ..kernels import cpu_threads
from ..kernels.registry import implementation


def _blocks(offsets):
    """(expert, start, stop) for every expert with at least one row."""
    for expert in range(len(offsets) - 1):
        start, stop = int(offsets[expert]), int(offsets[expert + 1])
        if stop > start:
            yield expert, start, stop


def _zero_idle(grads, offsets):
    """Zero the weight gradients of experts that got no rows (the others are overwritten whole)."""
    for expert in range(len(offsets) - 1):
        if int(offsets[expert + 1]) == int(offsets[expert]):
            for grad in grads:
                grad[expert] = 0


# ----- expert blocks over the CPU cores ----------------------------------------------------------------------
# On the CPU the blocks of NumPy arrays are spread over a pool of one thread per core (the kernels' pool,
# tinymoe.kernels.cpu_threads: the SwiGLU kernel of a block runs inline on its worker), each running one-thread
# BLAS (NumPy releases the GIL in matmul), largest block first: whole experts in parallel beat every GEMM
# split over all cores (a cpu-small MoE step on 2 cores: ~5% faster when the machine is idle, ~45% when other
# processes hold a core, as a core taken away then delays one block, not every GEMM's threads;
# perf/prototype_moe_step.py). Each block writes only its own rows and its own
# expert's gradients, and one thread computes all of a block, so results do not depend on the schedule.
# The one-thread BLAS limit is process-wide state for the region only (cpu_threads.enter_one_thread_blas).
# Without threadpoolctl, a single core, a single block, CuPy arrays or little work, blocks run in order:
# below MIN_PARALLEL_WORK (rows · d · ff of all blocks) waking the pool and switching the BLAS limit cost
# more than they save (measured on 2 cores, an MoE layer's forward + backward: equal at 3.4e7, 25% faster
# over the pool at 1.3e8; the `tinymoe train` defaults, 2.6e7 per layer, 8% faster in order).
MIN_PARALLEL_WORK = 1 << 26
_pool = {"executor": None, "controller": None}


def _cores() -> int:
    return cpu_threads.cores()


def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries (False here: run in order); None without it."""
    if _pool["controller"] is None:
        _pool["controller"] = cpu_threads.blas_controller() or False
    return _pool["controller"] or None


def run_blocks(work, blocks, like, work_per_row: int):
    """[work(block) for block in blocks], on the CPU's cores when that pays (see above); `like`: an input array;
    work_per_row: d · ff of the experts (a row's share of the work, for MIN_PARALLEL_WORK).

    blocks: tuples whose [1], [2] are the block's first and end row (their size orders the schedule).
    """
    cores = min(_cores(), len(blocks))
    nested = cpu_threads.in_worker()  # never wait on our own pool
    small = sum(block[2] - block[1] for block in blocks) * work_per_row < MIN_PARALLEL_WORK
    if cores < 2 or nested or small or not isinstance(like, np.ndarray) or _blas_controller() is None:
        return [work(block) for block in blocks]
    executor = _pool["executor"] = cpu_threads.executor(cores)
    largest_first = sorted(range(len(blocks)), key=lambda i: blocks[i][1] - blocks[i][2])
    cpu_threads.enter_one_thread_blas()
    try:
        results = dict(zip(largest_first, executor.map(lambda i: work(blocks[i]), largest_first)))
    finally:
        cpu_threads.leave_one_thread_blas()
    return [results[i] for i in range(len(blocks))]


class SwiGLUExperts(Function):
    """y[rows of e] = (silu(x w1[e]ᵀ) ⊙ x w3[e]ᵀ) w2[e]ᵀ for each expert e.

    w1[e] and w3[e] act as one stacked weight w13 = [w1[e]; w3[e]] (2ff, d): a view when w1 and w3 are the two
    halves of one (E, 2ff, d) array (as tinymoe.nn.Experts keeps them), else a 2ff·d copy per block, in forward
    and again in backward. One GEMM gives [a | b] = x w13ᵀ (n, 2ff), and the backward needs one GEMM for dx,
    one for [dw1[e]; dw3[e]] and none for a temporary: 6 GEMMs per expert instead of 9. Only [a | b] is saved
    per block (nothing under no_grad); h = silu(a)⊙b comes back from the backward kernel's single pass over
    (a, b), which on the last use of the saved arrays writes [da | db] over [a | b] and h over dh. Backward per
    block, with dh = dy w2[e]:
    (da, db, h) = swiglu'(a, b; dh);  dw2[e] = dyᵀ h;  [dw1[e]; dw3[e]] = [da | db]ᵀ x;  dx = [da | db] w13.
    dx sums over the 2ff columns in one product, so its bits differ from computing da w1 + db w3 in two. The
    gradients of w1 and w3 are the two halves of one (E, 2ff, d) array (views, each row contiguous).
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, xs, w1, w3, w2, offsets):
        xp = ctx.xp
        ctx.kernels = implementation(xs)
        swiglu, d_ff = ctx.kernels.swiglu, w1.shape[1]
        out = workspace.empty((xs.shape[0], w2.shape[1]), xs.dtype, xp)
        joint = joint_gate_up(w1, w3)

        def expert_forward(block):
            expert, start, stop = block
            gate_up = workspace.empty((stop - start, 2 * d_ff), xs.dtype, xp)
            xp.matmul(xs[start:stop], _stacked(xp, w1, w3, expert, joint).T, out=gate_up)  # (n, 2ff) = [a | b]
            xp.matmul(swiglu(gate_up[:, :d_ff], gate_up[:, d_ff:]), w2[expert].T, out=out[start:stop])
            return (expert, start, stop, gate_up) if ctx.requires_grad else None

        saved = [block for block in run_blocks(expert_forward, list(_blocks(offsets)), xs, d_ff * xs.shape[1])
                 if block is not None]
        ctx.save_for_backward(xs, w1, w3, w2, saved)
        ctx.offsets = offsets
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        xs, w1, w3, w2, saved = ctx.saved_tensors
        d_ff = w1.shape[1]
        n_experts, _, d_model = w1.shape
        grad_w13 = workspace.empty((n_experts, 2 * d_ff, d_model), w1.dtype, xp)  # [dw1[e]; dw3[e]] per expert
        grad_w1, grad_w3, grad_w2 = grad_w13[:, :d_ff], grad_w13[:, d_ff:], workspace.empty_like(w2, xp)
        _zero_idle((grad_w13, grad_w2), ctx.offsets)
        grad_xs = workspace.empty_like(xs, xp) if ctx.needs_input_grad[0] else None
        joint = joint_gate_up(w1, w3)

        def expert_backward(block):
            expert, start, stop, gate_up = block
            x_block, grad_block = xs[start:stop], grad[start:stop]
            grad_hidden = xp.matmul(grad_block, w2[expert], out=workspace.empty((stop - start, d_ff), xs.dtype, xp))
            grad_gate_up, activated = _swiglu_backward(ctx.kernels, xp, gate_up, grad_hidden, ctx.last_use)
            xp.matmul(grad_block.T, activated, out=grad_w2[expert])
            xp.matmul(grad_gate_up.T, x_block, out=grad_w13[expert])
            if grad_xs is not None:
                xp.matmul(grad_gate_up, _stacked(xp, w1, w3, expert, joint), out=grad_xs[start:stop])

        run_blocks(expert_backward, saved, xs, d_ff * xs.shape[1])
        return grad_xs, grad_w1, grad_w3, grad_w2


def joint_gate_up(w1, w3):
    """The (E, 2ff, d) array whose halves w1 (E, ff, d) and w3 are (as tinymoe.nn.Experts stores them), or None.

    Only NumPy arrays, and only when w1 = joint[:, :ff] and w3 = joint[:, ff:] exactly: then w13[e] = joint[e]
    is a view, and no per-expert copy is needed.
    """
    joint = getattr(w1, "base", None)
    if not (isinstance(w1, np.ndarray) and isinstance(joint, np.ndarray) and getattr(w3, "base", None) is joint):
        return None
    n_experts, d_ff, d_model = w1.shape
    if joint.shape != (n_experts, 2 * d_ff, d_model) or not joint.flags.c_contiguous or w3.shape != w1.shape:
        return None
    start = joint.__array_interface__["data"][0]
    if (w1.__array_interface__["data"][0] != start or w1.strides != joint.strides or w3.strides != joint.strides
            or w3.__array_interface__["data"][0] != start + d_ff * d_model * joint.itemsize):
        return None
    return joint


def _stacked(xp, w1, w3, expert, joint=None):
    """w13 = [w1[expert]; w3[expert]] (2ff, d): the gate and up projections as one weight (a view of `joint`,
    `joint_gate_up(w1, w3)`, when there is one; else a copy)."""
    if joint is not None:
        return joint[expert]
    stacked = workspace.empty((2 * w1.shape[1], w1.shape[2]), w1.dtype, xp)
    stacked[:w1.shape[1]], stacked[w1.shape[1]:] = w1[expert], w3[expert]
    return stacked


@functools.lru_cache(maxsize=None)
def _writes_into(kernel) -> frozenset:
    """Which of `out=(da, db)` and `h_out=h` a swiglu_backward kernel takes (Numba's and the reference take
    both; others may take neither)."""
    try:
        parameters = inspect.signature(kernel).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin or C function)
        return frozenset()
    return frozenset(name for name in ("out", "h_out") if name in parameters)


def _swiglu_backward(kernels, xp, gate_up, grad_h, last_use: bool):
    """([da | db] (n, 2ff), h (n, ff)) from the saved [a | b] (n, 2ff) and dh (n, ff), in one kernel pass.

    On the last use of the saved arrays, and when the kernel can, in place: [da | db] over [a | b] and h over dh
    (both this op's buffers): no new buffers, and a third less memory traffic (no cache lines fetched only to
    be overwritten).
    """
    d_ff = grad_h.shape[1]
    gate, up = gate_up[:, :d_ff], gate_up[:, d_ff:]
    takes = _writes_into(kernels.swiglu_backward)
    if last_use and takes == {"out", "h_out"}:
        kernels.swiglu_backward(gate, up, grad_h, out=(gate, up), h_out=grad_h)
        return gate_up, grad_h
    if "out" not in takes:
        grad_gate, grad_up, activated = kernels.swiglu_backward(gate, up, grad_h)
        return xp.concatenate((grad_gate, grad_up), axis=1), activated
    grad_gate_up = workspace.empty_like(gate_up, xp)
    _, _, activated = kernels.swiglu_backward(gate, up, grad_h, out=(grad_gate_up[:, :d_ff], grad_gate_up[:, d_ff:]))
    return grad_gate_up, activated


class MLPExperts(Function):
    """y[rows of e] = act(x w1[e]ᵀ + b1[e]) w2[e]ᵀ + b2[e], act from `array_math.ACTIVATIONS_WITH_DERIVATIVE`.

    Backward: dpre = (dy w2[e]) ⊙ act'(pre); dw2 = dyᵀ act(pre); db2 = Σ dy; dw1 = dpreᵀ x; db1 = Σ dpre;
    dx = dpre w1[e].
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, offsets, activation):
        xp = ctx.xp
        out = xp.empty((xs.shape[0], w2.shape[1]), xs.dtype)
        hidden = xp.empty((xs.shape[0], w1.shape[1]), xs.dtype)
        for expert, start, stop in _blocks(offsets):
            hidden[start:stop] = xs[start:stop] @ w1[expert].T + b1[expert]
        hidden, slopes = ACTIVATIONS_WITH_DERIVATIVE[activation](hidden)
        for expert, start, stop in _blocks(offsets):
            out[start:stop] = hidden[start:stop] @ w2[expert].T + b2[expert]
        ctx.save_for_backward(xs, w1, w2, hidden, slopes)
        ctx.offsets, ctx.bias_shapes = offsets, (b1.shape, b2.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        xs, w1, w2, hidden, slopes = ctx.saved_tensors
        grad_w1, grad_w2 = xp.zeros_like(w1), xp.zeros_like(w2)
        grad_b1, grad_b2 = xp.zeros(ctx.bias_shapes[0], xs.dtype), xp.zeros(ctx.bias_shapes[1], xs.dtype)
        grad_xs = xp.zeros_like(xs)
        for expert, start, stop in _blocks(ctx.offsets):
            grad_out = grad[start:stop]
            grad_w2[expert] = grad_out.T @ hidden[start:stop]
            grad_b2[expert] = grad_out.sum(axis=0)
            grad_pre = (grad_out @ w2[expert]) * slopes[start:stop]
            grad_w1[expert] = grad_pre.T @ xs[start:stop]
            grad_b1[expert] = grad_pre.sum(axis=0)
            grad_xs[start:stop] = grad_pre @ w1[expert]
        return grad_xs, grad_w1, grad_b1, grad_w2, grad_b2


# ----- unchecked entries: inputs trusted, they come from a RoutingPlan and an Experts module ---------------
def swiglu_experts_unchecked(xs, w1, w3, w2, expert_offsets):
    """`swiglu_experts` without any check (expert_offsets: host ints, like plan.expert_offsets_host)."""
    return SwiGLUExperts.apply(xs, w1, w3, w2, expert_offsets)


def mlp_experts_unchecked(xs, w1, b1, w2, b2, expert_offsets, activation):
    """`mlp_experts` without any check (expert_offsets: host ints, like plan.expert_offsets_host)."""
    return MLPExperts.apply(xs, w1, b1, w2, b2, expert_offsets, activation)


# ----- validated public functions ---------------------------------------------------------------------------
def _require_shape(tensor, argument, op, shape, meaning):
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{op}: {argument} must have shape {meaning} = {shape}, got {tensor.shape}")


def _check_offsets(expert_offsets, n_experts, n_rows, op) -> np.ndarray:
    """expert_offsets as host int64 (E+1,): starting at 0, non-decreasing, ending at the rows of xs."""
    if hasattr(expert_offsets, "device") and not isinstance(expert_offsets, np.ndarray):
        raise TypeError(f"{op}: expert_offsets must be host integers (a NumPy array or a sequence, like "
                        f"plan.expert_offsets_host), got {describe(expert_offsets)}")
    offsets = np.asarray(expert_offsets)
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"{op}: expert_offsets must hold integers, got {describe(expert_offsets)}")
    offsets = offsets.astype(np.int64)
    if offsets.shape != (n_experts + 1,):
        raise ValueError(f"{op}: expert_offsets must have E + 1 = {n_experts + 1} entries (one more than the "
                         f"experts of w1), got shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != n_rows:
        raise ValueError(f"{op}: expert_offsets must start at 0 and end at the rows of xs ({n_rows}), "
                         f"got {offsets[0]} ... {offsets[-1]}")
    steps = np.diff(offsets)
    if (steps < 0).any():
        e = int(np.nonzero(steps < 0)[0][0])
        raise ValueError(f"{op}: expert_offsets must be non-decreasing, got expert_offsets[{e}] = {offsets[e]} > "
                         f"expert_offsets[{e + 1}] = {offsets[e + 1]}")
    return offsets


def swiglu_experts(xs, w1, w3, w2, expert_offsets):
    """E SwiGLU experts on expert-sorted rows: y[r] = w2[e] (silu(w1[e] xs[r]) ⊙ w3[e] xs[r]) for r in e's block.

    xs Tensor (M, d); w1, w3 (E, ff, d); w2 (E, d, ff), all one dtype; expert_offsets host ints (E+1,), from 0
    to M, non-decreasing (a plan's `expert_offsets_host`) → (M, d).
    """
    op = "swiglu_experts"
    require_tensor(xs, "xs", op, ndim=2)
    for name, weight in (("w1", w1), ("w3", w3), ("w2", w2)):
        require_tensor(weight, name, op, ndim=3)
    require_same_dtype(op, xs=xs, w1=w1, w3=w3, w2=w2)
    n_experts, d_ff, d_model = w1.shape
    if xs.shape[1] != d_model:
        raise ValueError(f"{op}: xs has {xs.shape[1]} columns but w1 {w1.shape} takes d_model = {d_model}")
    _require_shape(w3, "w3", op, (n_experts, d_ff, d_model), "(E, ff, d) of w1")
    _require_shape(w2, "w2", op, (n_experts, d_model, d_ff), "(E, d, ff)")
    offsets = _check_offsets(expert_offsets, n_experts, xs.shape[0], op)
    return swiglu_experts_unchecked(xs, w1, w3, w2, offsets)


def mlp_experts(xs, w1, b1, w2, b2, expert_offsets, activation):
    """E two-layer experts on expert-sorted rows: y[r] = w2[e] act(w1[e] xs[r] + b1[e]) + b2[e] for r in e's block.

    xs Tensor (M, d); w1 (E, ff, d); b1 (E, ff); w2 (E, d, ff); b2 (E, d), all one dtype; expert_offsets host
    ints (E+1,), from 0 to M, non-decreasing; activation one of "relu", "gelu" (exact), "silu" → (M, d).
    """
    op = "mlp_experts"
    if activation not in ACTIVATIONS_WITH_DERIVATIVE:
        raise ValueError(f"{op}: activation={activation!r} is not supported; expected one of "
                         f"{tuple(ACTIVATIONS_WITH_DERIVATIVE)}")
    require_tensor(xs, "xs", op, ndim=2)
    for name, weight, ndim in (("w1", w1, 3), ("b1", b1, 2), ("w2", w2, 3), ("b2", b2, 2)):
        require_tensor(weight, name, op, ndim=ndim)
    require_same_dtype(op, xs=xs, w1=w1, b1=b1, w2=w2, b2=b2)
    n_experts, d_ff, d_model = w1.shape
    if xs.shape[1] != d_model:
        raise ValueError(f"{op}: xs has {xs.shape[1]} columns but w1 {w1.shape} takes d_model = {d_model}")
    _require_shape(b1, "b1", op, (n_experts, d_ff), "(E, ff)")
    _require_shape(w2, "w2", op, (n_experts, d_model, d_ff), "(E, d, ff)")
    _require_shape(b2, "b2", op, (n_experts, d_model), "(E, d)")
    offsets = _check_offsets(expert_offsets, n_experts, xs.shape[0], op)
    return mlp_experts_unchecked(xs, w1, b1, w2, b2, offsets, activation)
