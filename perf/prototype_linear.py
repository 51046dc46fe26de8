"""Prototype: dx = g @ W for g (T, E) with a small inner dimension E (the router's backward), interleaved.

    python perf/prototype_linear.py [--rounds 30]
"""
import argparse
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--inner", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    g = rng.standard_normal((args.tokens, args.inner)).astype(np.float32)
    w = rng.standard_normal((args.inner, args.width)).astype(np.float32)
    exact = g.astype(np.float64) @ w.astype(np.float64)

    def axpy_loop(g, w):
        out = np.multiply(g[:, :1], w[0])
        for j in range(1, g.shape[1]):
            out += g[:, j:j + 1] * w[j]
        return out

    variants = {
        "g @ W": lambda: g @ w,
        "(W.T @ g.T).T": lambda: (w.T @ g.T).T,
        "(W.T @ g.T).T contiguous": lambda: np.ascontiguousarray((w.T @ g.T).T),
        "einsum": lambda: np.einsum("te,ed->td", g, w),
        "axpy loop": lambda: axpy_loop(g, w),
        "gᶜ @ W (g Fortran)": lambda: np.asfortranarray(g) @ w,
    }
    for name, run in variants.items():
        error = np.abs(run() - exact).max()
        print(f"{name:28s} max |error| vs float64 {error:.2e}  deterministic {np.array_equal(run(), run())}")
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    for name in variants:
        print(f"{name:28s} min {min(times[name]):7.2f} ms  median {np.median(times[name]):7.2f} ms")


if __name__ == "__main__":
    main()
