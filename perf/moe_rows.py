"""The rows of bench_moe.py, each run by a worker process of its own (never two rows in one process).

    tinymoe      tm.nn.MoE forward + backward (load-balance loss included), library defaults
    torch-loop   PyTorch eager, transformers-style (torch_peers.transformers_style)
    torch-sort   PyTorch eager, sort-based (torch_peers.sort_based)
    floor        the nine expert matmuls of forward + backward alone, on contiguous blocks (NumPy / CuPy)
    floor-fused  the six matmuls per expert tinymoe runs (w1|w3 stacked), scheduled as tinymoe does on the CPU
    matmul       a square float32 product, 2048² on the CPU, 8192² on the GPU: the machine's matmul rate

Every worker builds the same arrays from the same NumPy seed (make_problem), so weights, inputs and hence
routing are identical across rows; `bench_moe.py --check` verifies the outputs and gradients agree.
Only the worker for a row imports that row's library.
"""
from __future__ import annotations

import concurrent.futures
import gc
import os
import statistics
import time

import numpy as np

from bench_common import LAYER_ROWS, MATMUL_SIZE, ROWS, SHAPES, reset_peak_rss, status_kib, trim_heap

WEIGHT_NAMES = ("router.weight", "experts.w1", "experts.w3", "experts.w2")
AUX_COEFFICIENT = 0.01


def make_problem(shape, seed=0) -> dict:
    """Weights, input and output cotangent of one layer, float32, generated without float64 temporaries (so
    set-up leaves no large freed blocks behind to flatter the memory measurement)."""
    tokens, d_model, d_ff, n_experts, _ = shape
    rng = np.random.default_rng(seed)

    def normal(shape_, scale=1.0):
        array = rng.standard_normal(shape_, dtype=np.float32)
        array *= np.float32(scale)
        return array

    return {
        "router.weight": normal((n_experts, d_model), d_model**-0.5),
        "experts.w1": normal((n_experts, d_ff, d_model), d_model**-0.5),
        "experts.w3": normal((n_experts, d_ff, d_model), d_model**-0.5),
        "experts.w2": normal((n_experts, d_model, d_ff), d_ff**-0.5),
        "x": normal((tokens, d_model)),
        "cotangent": normal((tokens, d_model)),
    }


def routed_counts(problem, top_k) -> np.ndarray:
    """(E,) assignments per expert of softmax top-k routing, in NumPy (softmax is monotonic: top-k of logits)."""
    logits = problem["x"] @ problem["router.weight"].T
    expert_ids = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    return np.bincount(expert_ids.reshape(-1), minlength=logits.shape[1])


# ----- the rows: each returns (training step, no_grad forward, synchronize) --------------------------------
def tinymoe_row(problem, shape, device, kernels=None):
    import tinymoe_api as api

    if kernels:
        api.use_kernels(kernels)  # a process-wide choice, inside this worker only
    moe = api.build_moe(shape, problem, device)
    x = api.tensor(problem["x"], device, requires_grad=True)
    cotangent = api.tensor(problem["cotangent"], device)

    def step():
        moe.zero_grad()
        x.grad = None
        out = moe(x)
        ((out * cotangent).sum() + AUX_COEFFICIENT * moe.aux_loss).backward()
        return out

    def forward():
        with api.no_grad():
            return moe(x)

    step.layer, step.input = moe, x  # for --check
    return step, forward, api.synchronizer(device)


def torch_row(problem, shape, device, peer, dtype="float32"):
    import torch

    from torch_peers import PEERS

    target = "cuda" if device == "cuda" else "cpu"
    if target == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32 (torch's default, said explicitly)
    weights = {name: torch.tensor(problem[name], device=target, dtype=getattr(torch, dtype), requires_grad=True)
               for name in WEIGHT_NAMES}
    x = torch.tensor(problem["x"], device=target, dtype=getattr(torch, dtype), requires_grad=True)
    cotangent = torch.tensor(problem["cotangent"], device=target, dtype=getattr(torch, dtype))
    layer, top_k = PEERS[peer], shape[4]

    def call():
        return layer(x, *(weights[name] for name in WEIGHT_NAMES), top_k)

    def step():
        for tensor in (*weights.values(), x):
            tensor.grad = None
        out, aux = call()
        ((out * cotangent).sum() + AUX_COEFFICIENT * aux).backward()
        step.aux = aux
        return out

    def forward():
        with torch.no_grad():
            return call()[0]

    step.weights, step.input = weights, x  # for --check
    synchronize = torch.cuda.synchronize if target == "cuda" else (lambda: None)
    return step, forward, synchronize


def _array_module(device):
    if device == "cuda":
        import tinymoe_api as api

        return api.import_cupy()
    return np


def floor_row(problem, shape, device):
    """The nine expert matmuls per expert of forward + backward, on contiguous blocks sized like the routing."""
    xp = _array_module(device)
    _, d_model, d_ff, n_experts, top_k = shape
    counts = routed_counts(problem, top_k)
    w1, w3, w2 = (xp.asarray(problem[name]) for name in ("experts.w1", "experts.w3", "experts.w2"))
    rows = int(counts.sum())
    xs = xp.asarray(np.resize(problem["x"], (rows, d_model)))
    gate, up = xp.empty((rows, d_ff), xp.float32), xp.empty((rows, d_ff), xp.float32)
    out, grad_x, scratch = (xp.empty((rows, d_model), xp.float32) for _ in range(3))
    grads = [xp.empty_like(w) for w in (w1, w3, w2)]
    offsets = np.concatenate([[0], np.cumsum(counts)])

    def step():
        for e in range(n_experts):
            a, b = int(offsets[e]), int(offsets[e + 1])
            if b == a:
                continue
            xe = xs[a:b]
            xp.matmul(xe, w1[e].T, out=gate[a:b])            # forward: gate, up, down
            xp.matmul(xe, w3[e].T, out=up[a:b])
            xp.matmul(gate[a:b], w2[e].T, out=out[a:b])
            xp.matmul(out[a:b].T, gate[a:b], out=grads[2][e])  # backward: dw2, dh, dw1, dw3, dx (two)
            xp.matmul(out[a:b], w2[e], out=up[a:b])
            xp.matmul(up[a:b].T, xe, out=grads[0][e])
            xp.matmul(gate[a:b].T, xe, out=grads[1][e])
            xp.matmul(up[a:b], w1[e], out=grad_x[a:b])
            xp.matmul(gate[a:b], w3[e], out=scratch[a:b])
            grad_x[a:b] += scratch[a:b]
        return grad_x

    return step, None, _synchronizer_for(xp, device)


def fused_floor_row(problem, shape, device):
    """The six matmuls per expert that tinymoe's SwiGLU experts run (w1|w3 stacked once here, outside the
    timing), scheduled as tinymoe schedules them on the CPU: one expert block per core, one BLAS thread each
    (threadpoolctl), largest block first; in order on the GPU and below tinymoe's work threshold. Nothing else:
    no SwiGLU, dispatch or router."""
    xp = _array_module(device)
    _, d_model, d_ff, n_experts, top_k = shape
    counts = routed_counts(problem, top_k)
    w13 = xp.asarray(np.concatenate([problem["experts.w1"], problem["experts.w3"]], axis=1))  # (E, 2ff, d)
    w2 = xp.asarray(problem["experts.w2"])
    rows = int(counts.sum())
    xs, grad_out = (xp.asarray(np.resize(problem[name], (rows, d_model))) for name in ("x", "cotangent"))
    gate_up, hidden = xp.empty((rows, 2 * d_ff), xp.float32), xp.zeros((rows, d_ff), xp.float32)
    out, grad_x = xp.empty((rows, d_model), xp.float32), xp.empty((rows, d_model), xp.float32)
    grad_w13, grad_w2 = xp.empty_like(w13), xp.empty_like(w2)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    blocks = sorted(((e, int(offsets[e]), int(offsets[e + 1])) for e in range(n_experts) if counts[e]),
                    key=lambda block: block[1] - block[2])

    def forward(block):
        e, a, b = block
        xp.matmul(xs[a:b], w13[e].T, out=gate_up[a:b])
        xp.matmul(hidden[a:b], w2[e].T, out=out[a:b])

    def backward(block):
        e, a, b = block
        xp.matmul(grad_out[a:b], w2[e], out=hidden[a:b])          # dh
        xp.matmul(grad_out[a:b].T, hidden[a:b], out=grad_w2[e])   # dw2 = dyᵀ h
        xp.matmul(gate_up[a:b].T, xs[a:b], out=grad_w13[e])       # [dw1; dw3] = [da | db]ᵀ x
        xp.matmul(gate_up[a:b], w13[e], out=grad_x[a:b])          # dx = [da | db] w13

    def in_order():
        for block in blocks:
            forward(block)
        for block in blocks:
            backward(block)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # tinymoe, too, runs its blocks in order without threadpoolctl
        ThreadpoolController = None
    small = rows * d_model * d_ff < 1 << 26  # tinymoe's functional.experts.MIN_PARALLEL_WORK
    if device == "cuda" or small or cores < 2 or len(blocks) < 2 or ThreadpoolController is None:
        return in_order, None, _synchronizer_for(xp, device)

    blas = ThreadpoolController().select(user_api="blas")  # found once, as tinymoe does
    pool = concurrent.futures.ThreadPoolExecutor(min(cores, len(blocks)))

    def step():
        with blas.limit(limits=1):
            list(pool.map(forward, blocks))
            list(pool.map(backward, blocks))
    return step, None, _synchronizer_for(xp, device)


def matmul_row(device):
    xp = _array_module(device)
    size = MATMUL_SIZE[device]
    a = xp.asarray(np.random.default_rng(1).standard_normal((size, size), dtype=np.float32))
    b = a.T.copy()
    return (lambda: a @ b), None, _synchronizer_for(xp, device)


def _synchronizer_for(xp, device):
    return (lambda: xp.cuda.Device().synchronize()) if device == "cuda" else (lambda: None)


def build_row(row, shape_name, device, kernels=None, seed=0):
    shape = SHAPES[shape_name]
    if row == "matmul":
        return matmul_row(device)
    problem = make_problem(shape, seed)
    if row == "tinymoe":
        return tinymoe_row(problem, shape, device, kernels)
    if row in ("torch-loop", "torch-sort"):
        return torch_row(problem, shape, device, row)
    if row == "floor":
        return floor_row(problem, shape, device)
    if row == "floor-fused":
        return fused_floor_row(problem, shape, device)
    raise ValueError(f"row={row!r} is unknown; expected one of {ROWS}")


# ----- what a worker measures -------------------------------------------------------------------------------
def time_row(row, shape_name, device, warmup, repeats, kernels=None) -> dict:
    """Median ms of `repeats` calls after `warmup` calls, each call bracketed by device synchronisation."""
    step, _, synchronize = build_row(row, shape_name, device, kernels)
    for _ in range(warmup):
        step()
    synchronize()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        synchronize()
        samples.append(1e3 * (time.perf_counter() - started))
    return {"ms": samples, "median_ms": statistics.median(samples)}


def peak_memory(row, shape_name, device, mode, kernels=None) -> dict:
    """Peak memory of one training step (mode "step") or one no_grad forward ("forward") above the set-up.

    CPU: a call at the tiny shape first (JIT compilation, thread pools, library start-up are not the
    step's memory), then the real set-up, the heap trimmed, VmHWM reset to VmRSS, one call, VmHWM − VmRSS.
    GPU: the allocator's peak above its use before the call (CuPy pool hook / torch.cuda max allocated).
    """
    if row not in LAYER_ROWS:
        raise ValueError(f"peak memory is measured for the layer rows {LAYER_ROWS}, not {row!r}")
    pick = 0 if mode == "step" else 1
    warm = build_row(row, "tiny", device, kernels)
    warm[pick]()
    warm[2]()
    del warm
    gc.collect()
    built = build_row(row, shape_name, device, kernels)
    call, synchronize = built[pick], built[2]
    if device == "cuda":
        return {"mib": _cuda_peak_mib(row, call, synchronize), "method": "device allocator peak"}
    gc.collect()
    trim_heap()
    baseline = status_kib("VmRSS:")
    if not reset_peak_rss():
        return {"mib": None, "method": "unavailable (/proc/self/clear_refs not writable)"}
    call()
    return {"mib": (status_kib("VmHWM:") - baseline) / 1024, "method": "VmHWM growth", "baseline_mib": baseline / 1024}


def _cuda_peak_mib(row, call, synchronize):  # UNTESTED: no GPU was available when this was written
    call()
    synchronize()
    if row == "tinymoe":
        import tinymoe_api as api

        cupy = api.import_cupy()
        pool = cupy.get_default_memory_pool()
        baseline, peak = pool.used_bytes(), [pool.used_bytes()]

        class PeakHook(cupy.cuda.MemoryHook):
            name = "peak"

            def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                peak[0] = max(peak[0], pool.used_bytes())

        with PeakHook():
            call()
            synchronize()
        return (peak[0] - baseline) / 2**20
    import torch

    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20
