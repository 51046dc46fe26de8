"""The one place where perf/ touches tinymoe: update this file when the package's API moves.

Public API: tm.nn.MoE(d_model=..., d_ff=..., n_experts=..., top_k=..., device=...), tm.io.load_mixtral(moe, ...) (the
transformers-style fused names), tm.tensor, tm.no_grad, tm.kernels.{use, chosen, available, implementation}.
Internals (marked below): the reference routing plan and its fields, the parameter names of the layer and
the field holding the routed counts, used by bench_dispatch.py, gpu_check.py and the --check mode.
"""
from __future__ import annotations

import numpy as np

import tinymoe as tm
from tinymoe import kernels

VERSION = tm.__version__
available_kernels = kernels.available      # (device) -> ['numpy', 'numba', ...]
chosen_kernels = kernels.chosen            # (device) -> the name 'auto' picks
use_kernels = kernels.use                  # context manager / process-wide choice
kernel_module = kernels.implementation     # (array, name) -> module with one function per primitive
no_grad = tm.no_grad

# ----- internals -------------------------------------------------------------------------------------------
from tinymoe.kernels import reference as reference_kernels  # noqa: E402  (the xp reference implementation)

# tinymoe's parameter name -> the name the benchmarks use for the same array (see make_problem)
PARAMETER_NAMES = {"router.weight": "router.weight", "experts.w1": "experts.w1", "experts.w3": "experts.w3",
                   "experts.w2": "experts.w2"}


def routing_plan(expert_ids, n_experts, capacity=None, valid=None):
    """The reference RoutingPlan (fields used here: n_rows, row_token, row_assignment, assignment_row,
    expert_offsets, requested_per_expert)."""
    return reference_kernels.routing_plan(expert_ids, n_experts, capacity, valid)


PLAN_INDEX_FIELDS = ("requested_per_expert", "expert_offsets", "row_token", "row_assignment", "assignment_row")


def cuda_kernels():
    """The CuPy RawKernel implementation module (needs CuPy and a GPU)."""
    from tinymoe.kernels import cuda

    return cuda


def import_cupy():
    from tinymoe.engine.backend import import_cupy as importer

    return importer()


def routed_counts(moe) -> np.ndarray:
    """(E,) assignments each expert processed in the last forward (dropless: what it was asked for)."""
    stats = moe.stats
    counts = getattr(stats, "tokens_per_expert", None)
    if counts is None:
        counts = stats.requested_per_expert
    return np.asarray(counts, dtype=np.int64)


# ----- public API ------------------------------------------------------------------------------------------
def build_moe(shape, weights, device="cpu"):
    """A softmax top-k (renormalised), dropless, SwiGLU, float32 MoE layer holding `weights`
    (router.weight (E, d), experts.w1/w3 (E, ff, d), experts.w2 (E, d, ff), NumPy)."""
    _, d_model, d_ff, n_experts, top_k = shape
    moe = tm.nn.MoE(d_model=d_model, d_ff=d_ff, n_experts=n_experts, top_k=top_k, device=device)
    tm.io.load_mixtral(moe, {
        "gate.weight": weights["router.weight"],
        "experts.gate_up_proj": np.concatenate([weights["experts.w1"], weights["experts.w3"]], axis=1),
        "experts.down_proj": weights["experts.w2"],
    })
    return moe


def tensor(array, device="cpu", requires_grad=False):
    return tm.tensor(array, device=device, requires_grad=requires_grad)


def to_numpy(tensor_or_array):
    if tensor_or_array is None:
        return None
    data = tensor_or_array.numpy() if hasattr(tensor_or_array, "numpy") else tensor_or_array
    return np.asarray(data.get() if hasattr(data, "get") else data)  # .get(): a CuPy array to the host


def gradients(moe) -> dict:
    """{benchmark name: gradient as NumPy} of the layer's weights after a backward."""
    parameters = dict(moe.named_parameters())
    return {ours: to_numpy(parameters[theirs].grad) for theirs, ours in PARAMETER_NAMES.items()}


def synchronizer(device):
    """A callable that waits for the device (a no-op on the CPU)."""
    if device != "cuda":
        return lambda: None
    cupy = import_cupy()
    return lambda: cupy.cuda.Device().synchronize()


def runtime_info() -> dict:
    """Which dispatch kernels run, and Numba's threading layer when Numba kernels ran."""
    info = {"tinymoe": VERSION}
    try:
        import numba

        info["numba_threading_layer"] = numba.threading_layer()
        info["numba_threads"] = numba.get_num_threads()
    except (ImportError, ValueError):  # ValueError: no parallel region ran yet
        pass
    return info
