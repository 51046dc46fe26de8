"""Forward + backward of one MoE layer: tinymoe against PyTorch eager peers, in the same run.

Shapes and peers are those of shared/BENCHMARKS.md: SwiGLU experts, softmax top-k (renormalised),
dropless, float32, load-balance loss included, identical weights and routing for every implementation.
FLOPs counted: 3 · T·k · 6·d·ff (the expert matmuls, forward and backward; the router is ignored).

    python perf/bench_moe.py                       # cpu-small on the CPU
    python perf/bench_moe.py --device cuda         # the three shapes on a GPU (needs CuPy)
    python perf/bench_moe.py --memory              # also peak memory of one step and of a no_grad forward

Prints ms (median after warm-up), GFLOP/s, tinymoe / best peer, and the fraction of this machine's matmul
rate (measured in this run: a float32 2048² (CPU) or 8192² (GPU) product), plus the time of the expert
matmuls alone (the floor for this routing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # name: (T, d, ff, E, k)
    "cpu-small": (4096, 512, 1024, 8, 2),
    "mixtral-like": (16384, 1024, 2816, 8, 2),
    "fine-grained": (16384, 1024, 512, 64, 6),
}


def flops(shape) -> float:
    tokens, d_model, d_ff, _, top_k = shape
    return 3.0 * tokens * top_k * 6.0 * d_model * d_ff


def make_problem(shape, seed=0):
    tokens, d_model, d_ff, n_experts, _ = shape
    rng = np.random.default_rng(seed)
    scale_in, scale_out = 1 / np.sqrt(d_model), 1 / np.sqrt(d_ff)
    return {
        "router.weight": (rng.standard_normal((n_experts, d_model)) * scale_in).astype(np.float32),
        "experts.w1": (rng.standard_normal((n_experts, d_ff, d_model)) * scale_in).astype(np.float32),
        "experts.w3": (rng.standard_normal((n_experts, d_ff, d_model)) * scale_in).astype(np.float32),
        "experts.w2": (rng.standard_normal((n_experts, d_model, d_ff)) * scale_out).astype(np.float32),
        "x": rng.standard_normal((tokens, d_model)).astype(np.float32),
        "cotangent": rng.standard_normal((tokens, d_model)).astype(np.float32),
    }


class Clock:
    """Median wall time of a callable; synchronises the GPU around each call when asked."""

    def __init__(self, synchronize=None):
        self.synchronize = synchronize or (lambda: None)

    def interleaved_medians_ms(self, steps: dict, repeats, warmup=2) -> dict:
        """Median ms of each callable, timed in turns (one call of each per round), so that a machine whose
        speed drifts during the run (a shared VM) slows every implementation alike."""
        for step in steps.values():
            for _ in range(warmup):
                step()
        times = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                self.synchronize()
                started = time.perf_counter()
                step()
                self.synchronize()
                times[name].append(time.perf_counter() - started)
        return {name: 1e3 * statistics.median(values) for name, values in times.items()}


# ----- tinymoe ---------------------------------------------------------------------------------------------
def tinymoe_step(problem, shape, device):
    import tinymoe as tm

    _, d_model, d_ff, n_experts, top_k = shape
    moe = tm.nn.MoE(d_model, d_ff, n_experts, top_k=top_k, device=device)
    moe.load_state_dict({name: problem[name] for name in ("router.weight", "experts.w1", "experts.w3", "experts.w2")})
    x = tm.tensor(problem["x"], device=device, requires_grad=True)
    cotangent = tm.tensor(problem["cotangent"], device=device)

    def step():
        moe.zero_grad()
        x.grad = None
        out = moe(x)
        loss = (out * cotangent).sum() + 0.01 * moe.aux_loss
        loss.backward()
        return out

    def forward_only():
        with tm.no_grad():
            return moe(x)

    return moe, step, forward_only


def expert_matmuls_only(problem, shape, counts, xp):
    """The nine expert matmuls of forward + backward on contiguous blocks of `counts` rows: the floor."""
    _, d_model, d_ff, n_experts, _ = shape
    w1, w3, w2 = (xp.asarray(problem[name]) for name in ("experts.w1", "experts.w3", "experts.w2"))
    rows = int(sum(counts))
    xs = xp.asarray(np.resize(problem["x"], (rows, d_model)))
    gate, up = xp.empty((rows, d_ff), xp.float32), xp.empty((rows, d_ff), xp.float32)
    out, grad_x = xp.empty((rows, d_model), xp.float32), xp.empty((rows, d_model), xp.float32)
    grads = [xp.empty_like(w) for w in (w1, w3, w2)]
    offsets = np.concatenate([[0], np.cumsum(counts)])

    def step():
        for e in range(n_experts):
            a, b = int(offsets[e]), int(offsets[e + 1])
            if b == a:
                continue
            xe = xs[a:b]
            xp.matmul(xe, w1[e].T, out=gate[a:b])
            xp.matmul(xe, w3[e].T, out=up[a:b])
            xp.matmul(gate[a:b], w2[e].T, out=out[a:b])
            xp.matmul(out[a:b].T, gate[a:b], out=grads[2][e])
            xp.matmul(out[a:b], w2[e], out=up[a:b])
            xp.matmul(up[a:b].T, xe, out=grads[0][e])
            xp.matmul(gate[a:b].T, xe, out=grads[1][e])
            xp.matmul(up[a:b], w1[e], out=grad_x[a:b])
            grad_x[a:b] += gate[a:b] @ w3[e]
    return step


def square_matmul(xp, size):
    """A float32 size² product: the machine's matmul rate, 2·size³ FLOP per call."""
    a = xp.asarray(np.random.default_rng(1).standard_normal((size, size)).astype(np.float32))
    b = a.T.copy()
    return lambda: a @ b


# ----- PyTorch peers ---------------------------------------------------------------------------------------
def torch_steps(problem, shape, device):
    try:
        import torch
    except ImportError:
        return {}
    from torch_peers import PEERS

    torch.backends.cuda.matmul.allow_tf32 = False
    target = "cuda" if device == "cuda" else "cpu"
    weights = {name: torch.tensor(problem[name], device=target, requires_grad=True)
               for name in ("router.weight", "experts.w1", "experts.w3", "experts.w2")}
    x = torch.tensor(problem["x"], device=target, requires_grad=True)
    cotangent = torch.tensor(problem["cotangent"], device=target)
    top_k = shape[4]
    steps = {}
    for name, layer in PEERS.items():
        def step(layer=layer):
            for tensor in (*weights.values(), x):
                tensor.grad = None
            out, aux = layer(x, weights["router.weight"], weights["experts.w1"], weights["experts.w3"],
                             weights["experts.w2"], top_k)
            ((out * cotangent).sum() + 0.01 * aux).backward()
            return out

        def forward_only(layer=layer):
            with torch.no_grad():
                return layer(x, weights["router.weight"], weights["experts.w1"], weights["experts.w3"],
                             weights["experts.w2"], top_k)[0]
        steps[name] = (step, forward_only)
    return steps


# ----- peak memory (each measurement in a fresh process) ---------------------------------------------------
def _resident_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def memory_child(implementation, shape_name, mode, device):
    """Peak memory above the set-up (weights, inputs) of one training step or one no_grad forward, in MiB."""
    shape = SHAPES[shape_name]
    problem = make_problem(shape)
    if implementation == "tinymoe":
        _, step, forward_only = tinymoe_step(problem, shape, device)
    else:
        step, forward_only = torch_steps(problem, shape, device)[implementation]
    run = step if mode == "step" else forward_only
    if device == "cuda":
        return _cuda_peak(implementation, run)
    run()  # first call: JIT compilation and library workspaces are set-up, not the step's memory
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak resident size (VmHWM) to the current one
    baseline = _resident_kib("VmRSS:")
    run()
    return (_resident_kib("VmHWM:") - baseline) / 1024


def _cuda_peak(implementation, run):
    run()
    if implementation == "tinymoe":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        baseline, peak = pool.used_bytes(), [0]

        class PeakHook(cupy.cuda.MemoryHook):
            name = "peak"

            def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                peak[0] = max(peak[0], pool.used_bytes())

        with PeakHook():
            run()
            cupy.cuda.Device().synchronize()
        return (peak[0] - baseline) / 2**20
    import torch

    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def measure_memory(implementation, shape_name, mode, device):
    command = [sys.executable, __file__, "--memory-child", implementation, shape_name, mode, "--device", device]
    # glibc keeps freed blocks resident and raises its mmap threshold as big blocks come and go, so a second
    # step would reuse the first one's pages and hide its peak; a fixed threshold returns them on free().
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 17), MALLOC_TRIM_THRESHOLD_=str(1 << 17))
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode:
        return f"failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
    return f"{float(result.stdout.strip()):.0f} MiB"


# ----- the table -------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated names (default: cpu-small on cpu, all on cuda)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (fresh processes)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(memory_child(*args.memory_child, args.device))
        return

    import tinymoe as tm

    if args.device == "cuda":
        import cupy

        xp, clock, matmul_size = cupy, Clock(lambda: cupy.cuda.Device().synchronize()), 8192
    else:
        xp, clock, matmul_size = np, Clock(), 2048
    names = args.shapes.split(",") if args.shapes else (["cpu-small"] if args.device == "cpu" else list(SHAPES))
    kernels = tm.kernels.chosen(args.device)
    print(f"device {args.device}, kernels {kernels!r}; every row timed in turns with the others "
          f"({args.repeats} rounds, median)")
    results = []
    for name in names:
        shape = SHAPES[name]
        problem = make_problem(shape)
        moe, step, forward_only = tinymoe_step(problem, shape, args.device)
        step()
        steps = {"tinymoe": step,
                 "expert matmuls alone": expert_matmuls_only(problem, shape, moe.stats.tokens_per_expert, xp)}
        peer_steps = {peer: peer_step for peer, (peer_step, _) in torch_steps(problem, shape, args.device).items()}
        matmul = f"{matmul_size}² matmul"
        rows = clock.interleaved_medians_ms({**steps, **peer_steps, matmul: square_matmul(xp, matmul_size)},
                                            args.repeats)
        rate = 2.0 * matmul_size**3 / (rows.pop(matmul) / 1e3) / 1e9
        reference = np.asarray(step().numpy(), dtype=np.float64)
        agreement = {}
        for peer, peer_step in peer_steps.items():
            peer_out = peer_step().detach().cpu().numpy().astype(np.float64)
            agreement[peer] = float(np.abs(peer_out - reference).max() / np.abs(reference).max())
        peers = [value for key, value in rows.items() if key.startswith("torch")]
        best_peer = min(peers) if peers else None
        print(f"\n{name}: T={shape[0]} d={shape[1]} ff={shape[2]} E={shape[3]} k={shape[4]}, "
              f"{flops(shape) / 1e9:.1f} GFLOP per step; float32 {matmul}: {rate:.0f} GFLOP/s")
        print(f"  {'implementation':<26}{'ms':>9}{'GFLOP/s':>10}{'of matmul':>11}{'vs best peer':>14}")
        for key, milliseconds in rows.items():
            gflops = flops(shape) / (milliseconds / 1e3) / 1e9
            versus = f"{milliseconds / best_peer:.2f}x" if best_peer else "-"
            print(f"  {key:<26}{milliseconds:9.1f}{gflops:10.1f}{gflops / rate:10.0%}{versus:>14}")
        for peer, error in agreement.items():
            print(f"  outputs: tinymoe vs {peer}: max relative difference {error:.1e}")
        result = {"shape": name, "ms": rows, "matmul_gflops": rate, "agreement": agreement, "kernels": kernels}
        if args.memory:
            memory = {}
            for implementation in ["tinymoe", *agreement]:
                memory[implementation] = {mode: measure_memory(implementation, name, mode, args.device)
                                          for mode in ("step", "forward")}
                print(f"  peak memory {implementation:<24} training step {memory[implementation]['step']:>9}, "
                      f"no_grad forward {memory[implementation]['forward']:>9}")
            result["memory"] = memory
        results.append(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
