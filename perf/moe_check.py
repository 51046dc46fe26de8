"""bench_moe.py --check: do all rows compute the same layer? (Correctness only: one process runs them all,
which is fine for comparing numbers and never used for timing.)

The oracle is the transformers-style PyTorch layer in float64 on the same (float32-valued) weights and input.
Compared with it, for tinymoe and both float32 PyTorch peers: the output, dL/dx, the four weight gradients
and the load-balance loss, as max |a − b| / max |oracle|; and the per-expert routed counts of tinymoe, of
the oracle and of the NumPy routing the floor row uses (they must be equal: identical routing).
"""
from __future__ import annotations

import numpy as np

from bench_common import SHAPES
from moe_rows import WEIGHT_NAMES, make_problem, routed_counts, tinymoe_row, torch_row

TOLERANCE = 1e-4  # float32 against float64, relative to the largest magnitude of each quantity


def _torch_results(problem, shape, device, peer, dtype):
    import torch

    step, _, _ = torch_row(problem, shape, device, peer, dtype)
    out = step()
    results = {"out": out, "grad x": step.input.grad, "aux": step.aux}
    results.update({f"grad {name}": step.weights[name].grad for name in WEIGHT_NAMES})
    results = {key: value.detach().cpu().numpy().astype(np.float64) for key, value in results.items()}
    top_k = shape[4]
    with torch.no_grad():
        logits = step.input @ step.weights["router.weight"].T
        ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1).indices
    results["counts"] = np.bincount(ids.reshape(-1).cpu().numpy(), minlength=shape[3])
    return results


def _tinymoe_results(problem, shape, device, kernels):
    import tinymoe_api as api

    step, _, _ = tinymoe_row(problem, shape, device, kernels)
    out = step()
    moe = step.layer
    results = {"out": api.to_numpy(out), "grad x": api.to_numpy(step.input.grad), "aux": api.to_numpy(moe.aux_loss)}
    results.update({f"grad {name}": grad for name, grad in api.gradients(moe).items()})
    results = {key: np.asarray(value, dtype=np.float64) for key, value in results.items()}
    results["counts"] = api.routed_counts(moe)
    return results


def run_check(shape_name, device="cpu", kernels=None) -> int:
    """Print the comparison table; return 0 when everything agrees, 1 otherwise."""
    shape = SHAPES[shape_name]
    problem = make_problem(shape)
    oracle = _torch_results(problem, shape, device, "torch-loop", "float64")
    candidates = {"tinymoe": _tinymoe_results(problem, shape, device, kernels),
                  "torch-loop float32": _torch_results(problem, shape, device, "torch-loop", "float32"),
                  "torch-sort float32": _torch_results(problem, shape, device, "torch-sort", "float32")}
    floor_counts = routed_counts(problem, shape[4])
    failures = []
    quantities = [key for key in oracle if key != "counts"]
    print(f"--check on {shape_name} ({device}): max |result − oracle| / max |oracle|, oracle = torch-loop float64; "
          f"tolerance {TOLERANCE:g}")
    print(f"  {'quantity':<24}" + "".join(f"{name:>20}" for name in candidates))
    for key in quantities:
        scale = max(float(np.abs(oracle[key]).max()), 1e-30)
        cells = []
        for name, results in candidates.items():
            if results[key].shape != oracle[key].shape:
                failures.append(f"{name} {key}: shape {results[key].shape} vs {oracle[key].shape}")
                cells.append("shape!")
                continue
            error = float(np.abs(results[key] - oracle[key]).max()) / scale
            if not error <= TOLERANCE:
                failures.append(f"{name} {key}: {error:.2e}")
            cells.append(f"{error:.2e}")
        print(f"  {key:<24}" + "".join(f"{cell:>20}" for cell in cells))
    counts = {"oracle": oracle["counts"], "floor (NumPy routing)": floor_counts,
              **{name: results["counts"] for name, results in candidates.items()}}
    for name, value in counts.items():
        same = np.array_equal(value, oracle["counts"])
        if not same:
            failures.append(f"routed counts of {name} {value.tolist()} differ from the oracle's")
        print(f"  routed counts {name:<24} {value.tolist()}{'' if same else '  <- DIFFERENT'}")
    for failure in failures:
        print("  FAIL", failure)
    print("check:", "FAILED" if failures else "all agree")
    return 1 if failures else 0
