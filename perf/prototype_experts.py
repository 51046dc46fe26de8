"""Prototype (not a benchmark of record): SwiGLU expert fwd+bwd variants at cpu-small, interleaved in one process.

    python perf/prototype_experts.py [--rounds 7] [--variants current,fused,...]

Variants run A B C A B C ... and report min / median ms; use for relative decisions only (shared machine).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import time

import numpy as np

import tinymoe as tm
from tinymoe.functional.experts import SwiGLUExperts
from tinymoe.engine.function import Function
from tinymoe.functional.experts import _blocks, _zero_idle
from tinymoe.kernels import numba_cpu as nc
from tinymoe.kernels.registry import implementation

T, D, FF, E, K = 4096, 512, 1024, 8, 2


class OldSwiGLUExperts(Function):
    """The SwiGLUExperts before the w1|w3 fusion (9 GEMMs per expert), frozen here for comparison.

    y[rows of e] = (silu(x w1[e]ᵀ) ⊙ x w3[e]ᵀ) w2[e]ᵀ for each expert e.

    Works one expert block at a time and saves only a = x w1ᵀ and b = x w3ᵀ per block (none under no_grad);
    h = silu(a)⊙b comes back from the backward kernel's single pass over (a, b). Block-sized temporaries
    are also what the allocator can reuse from step to step (whole (M, ff) arrays are fresh pages each time).
    Backward per expert block, with dh = dy w2[e]:
    (da, db, h) = swiglu'(a, b; dh);  dw2[e] = dyᵀ h;  dw1[e] = daᵀ x;  dw3[e] = dbᵀ x;  dx = da w1[e] + db w3[e].
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, xs, w1, w3, w2, offsets):
        xp = ctx.xp
        ctx.kernels = implementation(xs)
        swiglu = ctx.kernels.swiglu
        out = xp.empty((xs.shape[0], w2.shape[1]), xs.dtype)
        saved = []
        for expert, start, stop in _blocks(offsets):
            x_block = xs[start:stop]
            gate, up = x_block @ w1[expert].T, x_block @ w3[expert].T
            xp.matmul(swiglu(gate, up), w2[expert].T, out=out[start:stop])
            if ctx.requires_grad:
                saved.append((expert, start, stop, gate, up))
        ctx.save_for_backward(xs, w1, w3, w2, saved)
        ctx.offsets = offsets
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        xs, w1, w3, w2, saved = ctx.saved_tensors
        swiglu_backward = ctx.kernels.swiglu_backward
        grad_w1, grad_w3, grad_w2 = xp.empty_like(w1), xp.empty_like(w3), xp.empty_like(w2)
        _zero_idle((grad_w1, grad_w3, grad_w2), ctx.offsets)
        grad_xs = xp.empty_like(xs) if ctx.needs_input_grad[0] else None
        for expert, start, stop, gate, up in saved:
            x_block, grad_block = xs[start:stop], grad[start:stop]
            grad_gate, grad_up, activated = swiglu_backward(gate, up, grad_block @ w2[expert])
            xp.matmul(grad_block.T, activated, out=grad_w2[expert])
            xp.matmul(grad_gate.T, x_block, out=grad_w1[expert])
            xp.matmul(grad_up.T, x_block, out=grad_w3[expert])
            if grad_xs is not None:
                xp.matmul(grad_gate, w1[expert], out=grad_xs[start:stop])
                grad_xs[start:stop] += grad_up @ w3[expert]
        return grad_xs, grad_w1, grad_w3, grad_w2


def problem(seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(T * K, np.ones(E) / E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xs = rng.standard_normal((T * K, D)).astype(np.float32)
    w1, w3 = (rng.standard_normal((E, FF, D)).astype(np.float32) / np.sqrt(D) for _ in range(2))
    w2 = rng.standard_normal((E, D, FF)).astype(np.float32) / np.sqrt(FF)
    grad = rng.standard_normal((T * K, D)).astype(np.float32)
    return xs, w1, w3, w2, offsets, grad


def blocks(offsets):
    return [(e, int(offsets[e]), int(offsets[e + 1])) for e in range(E) if offsets[e + 1] > offsets[e]]


def current(xs, w1, w3, w2, offsets, grad, function=None):
    tensors = [tm.tensor(a, requires_grad=True) for a in (xs, w1, w3, w2)]
    out = (function or OldSwiGLUExperts).apply(*tensors, offsets)
    out.backward(tm.tensor(grad))
    return [t.grad for t in tensors]


def fused_block_forward(x, w13, w2e, out_rows):
    gate_up = x @ w13.T
    ff = w2e.shape[1]
    h = np.empty((x.shape[0], ff), x.dtype)
    nc._swiglu(gate_up[:, :ff], gate_up[:, ff:], h)
    np.matmul(h, w2e.T, out=out_rows)
    return gate_up


def fused_block_backward(x, g, gate_up, w13, w2e, gw1, gw3, gw2, gx):
    ff = w2e.shape[1]
    grad_h = g @ w2e
    grad_gu = np.empty_like(gate_up)
    h = np.empty_like(grad_h)
    nc._swiglu_backward(gate_up[:, :ff], gate_up[:, ff:], grad_h, grad_gu[:, :ff], grad_gu[:, ff:], h)
    np.matmul(g.T, h, out=gw2)
    np.matmul(grad_gu[:, :ff].T, x, out=gw1)
    np.matmul(grad_gu[:, ff:].T, x, out=gw3)
    np.matmul(grad_gu, w13, out=gx)


def fused(xs, w1, w3, w2, offsets, grad, pool=None):
    out = np.empty_like(xs)
    gw1, gw3, gw2, gx = np.empty_like(w1), np.empty_like(w3), np.empty_like(w2), np.empty_like(xs)
    order = sorted(blocks(offsets), key=lambda b: b[1] - b[2])  # largest first
    w13 = {}
    saved = {}

    def fwd(block):
        e, s, t = block
        w13[e] = np.concatenate([w1[e], w3[e]])
        saved[e] = fused_block_forward(xs[s:t], w13[e], w2[e], out[s:t])

    def bwd(block):
        e, s, t = block
        fused_block_backward(xs[s:t], grad[s:t], saved[e], w13[e], w2[e], gw1[e], gw3[e], gw2[e], gx[s:t])

    for stage in (fwd, bwd):
        if pool is None:
            for block in order:
                stage(block)
        else:
            list(pool.map(stage, order))
    return gx, gw1, gw3, gw2


def fused_staged(xs, w1, w3, w2, offsets, grad, pool):
    """Matmuls of all blocks on the pool (1-thread BLAS each), the SwiGLU kernels on the calling thread."""
    ff = FF
    out = np.empty_like(xs)
    gw1, gw3, gw2, gx = np.empty_like(w1), np.empty_like(w3), np.empty_like(w2), np.empty_like(xs)
    order = sorted(blocks(offsets), key=lambda b: b[1] - b[2])
    gate_up, h, grad_h, grad_gu = {}, {}, {}, {}
    w13 = {e: np.concatenate([w1[e], w3[e]]) for e, _, _ in order}
    list(pool.map(lambda b: gate_up.__setitem__(b[0], xs[b[1]:b[2]] @ w13[b[0]].T), order))
    for e, s, t in order:
        h[e] = np.empty((t - s, ff), np.float32)
        nc._swiglu(gate_up[e][:, :ff], gate_up[e][:, ff:], h[e])
    list(pool.map(lambda b: np.matmul(h[b[0]], w2[b[0]].T, out=out[b[1]:b[2]]), order))
    list(pool.map(lambda b: grad_h.__setitem__(b[0], grad[b[1]:b[2]] @ w2[b[0]]), order))
    for e, s, t in order:
        grad_gu[e] = np.empty_like(gate_up[e])
        nc._swiglu_backward(gate_up[e][:, :ff], gate_up[e][:, ff:], grad_h[e], grad_gu[e][:, :ff], grad_gu[e][:, ff:],
                            h[e])

    def weights(b):
        e, s, t = b
        np.matmul(grad[s:t].T, h[e], out=gw2[e])
        np.matmul(grad_gu[e][:, :ff].T, xs[s:t], out=gw1[e])
        np.matmul(grad_gu[e][:, ff:].T, xs[s:t], out=gw3[e])
        np.matmul(grad_gu[e], w13[e], out=gx[s:t])
    list(pool.map(weights, order))
    return gx, gw1, gw3, gw2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default="current,fused,fused-threads")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits
    data = problem()
    pool = concurrent.futures.ThreadPoolExecutor(2)

    def fused_threads(*a):
        with threadpool_limits(1, user_api="blas"):
            return fused(*a, pool=pool)

    def staged(*a):
        with threadpool_limits(1, user_api="blas"):
            return fused_staged(*a, pool=pool)
    import tinymoe.functional.experts as experts_module

    def new_serial(*a):
        controller, experts_module._pool["controller"] = experts_module._pool["controller"], False
        try:
            return current(*a, function=SwiGLUExperts)
        finally:
            experts_module._pool["controller"] = controller
    variants = {"current": current, "new": lambda *a: current(*a, function=SwiGLUExperts),
                "new-serial": new_serial, "fused": fused, "fused-threads": fused_threads, "staged": staged,
                "fused-threads2blas": lambda *a: fused(*a, pool=pool)}
    chosen = args.variants.split(",")
    reference = current(*data)
    for name in chosen:
        result = variants[name](*data)
        for r, x in zip(reference, result):
            np.testing.assert_allclose(x, r, rtol=2e-3, atol=2e-3)
        for _ in range(1):
            variants[name](*data)
    times = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name in chosen:
            start = time.perf_counter()
            variants[name](*data)
            times[name].append((time.perf_counter() - start) * 1e3)
    for name in chosen:
        print(f"{name:22s} min {min(times[name]):7.1f} ms  median {np.median(times[name]):7.1f} ms")


if __name__ == "__main__":
    main()
