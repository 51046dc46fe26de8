"""The scripts in examples/ run, each as a learner runs it (`python examples/NAME.py`, in a fresh directory),
and print what their docstrings promise: each test checks a few key lines against what must hold whatever the
seed (a bound, an identity, a recount from the printed numbers), not against a stored copy of the output.

The quick ones (a few seconds each) run by default; the slow ones (training runs of 5-50 s) are marked slow
and run with TINYMOE_RUN_SLOW_EXAMPLES=1.
"""
import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RUN_SLOW = os.environ.get("TINYMOE_RUN_SLOW_EXAMPLES") == "1"


def slow(test):
    """Marked slow, and skipped (shown as skipped, with the reason) unless TINYMOE_RUN_SLOW_EXAMPLES=1."""
    skip = pytest.mark.skipif(not RUN_SLOW, reason="slow example: set TINYMOE_RUN_SLOW_EXAMPLES=1 to run it")
    return pytest.mark.slow(skip(test))


def run_example(name, cwd, timeout=300):
    """stdout of `python examples/<name>.py` run in `cwd`; fails the test with its output on a non-zero exit."""
    environment = {**os.environ, "MPLBACKEND": "Agg"}
    environment.pop("TINYMOE_KERNELS", None)       # each example picks (or forces) its own kernels
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name}.py exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def number_after(label, text):
    match = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", text)
    assert match, f"no {label!r} in the output:\n{text}"
    return float(match.group(1))


# ----- quick examples (default) -------------------------------------------------------------------------------
def test_mixtral_layer_matches_the_formula_and_round_trips(tmp_path):
    out = run_example("mixtral_layer", tmp_path)
    assert number_after("max relative difference", out) < 1e-5
    assert "identical to the file: True" in out
    assert (tmp_path / "runs/examples/mixtral_layer.safetensors").stat().st_size > 0


def test_gradcheck_routing_tells_its_four_stories(tmp_path):
    out = run_example("gradcheck_routing", tmp_path)
    lines = {line.split(".")[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert set(lines) == {"1", "2", "3", "4"}, out
    assert "right backward: passed" in lines["1"]
    caught = re.search(r"caught, (\d+) of (\d+) comparisons failed", lines["2"])
    assert caught and int(caught.group(2)) == 12 and 0 < int(caught.group(1)) <= 12   # 3x4 input, every element
    assert number_after("token 0's top two logits differ by", out) < 1e-6              # a real near-tie (< eps)
    assert "plain check: passed=False" in out                                           # the jump is measured
    excluded = re.search(r"discrete=moe_decisions\(moe\): passed=True, excluded (\d+) ", out)
    assert excluded and int(excluded.group(1)) > 0, out
    assert re.search(r"passed: \d+ comparisons, (\d+) perturbations excluded", out).group(1) == excluded.group(1)
    assert "fixed atol (roundoff=0): passed=False" in out and re.search(r"= [0-9.e-]+: passed=True", out)
    assert "still caught" in out


def test_load_pretrained_generates_from_a_written_checkpoint(tmp_path):
    out = run_example("load_pretrained", tmp_path)
    assert "qwen3_moe: 2 layers, hidden 32" in out and "2 MoE layers of 8 experts (top-2)" in out
    assert "logits (2, 4, 64)" in out
    prompt = [[2, 3, 4, 5], [5, 4, 3, 2]]
    for label in ("greedy :", "sampled:"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        rows = ast.literal_eval(line.removeprefix(label).strip())
        assert [row[:4] for row in rows] == prompt and all(len(row) == 4 + 8 for row in rows)
        assert all(0 <= token < 64 for row in rows for token in row)


def test_routing_view_prints_consistent_loads(tmp_path):
    out = run_example("routing_view", tmp_path)
    layers = re.findall(r"layer (\d+): tokens per expert (\[[0-9, ]+\]), max/mean ([0-9.]+)", out)
    assert [int(index) for index, _, _ in layers] == [0, 1, 2, 3], out
    totals = set()
    for _, counts, ratio in layers:
        counts = ast.literal_eval(counts)
        assert len(counts) == 8
        totals.add(sum(counts))
        assert float(ratio) == pytest.approx(max(counts) / (sum(counts) / len(counts)), abs=0.006)
    assert len(totals) == 1                       # every layer routes the same tokens, top-k each (dropless)
    assert (tmp_path / "runs/examples/routing_view.png").exists()


def test_embed_numpy_only_trains_a_tiny_model_and_needs_only_numpy(tmp_path):
    out = run_example("embed_numpy_only", tmp_path)   # no runs/tinymoe here: it trains runs/examples/tiny first
    assert "numba imported: False | cupy imported: False" in out
    expected = re.search(r"the model expects: (.*)", out).group(1)
    probabilities = [float(p) for p in re.findall(r"' ([0-9.]+)", expected)]
    assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert (tmp_path / "runs/examples/tiny/checkpoint.npz").exists()


def test_diagnose_run_finds_the_routing_problems_it_was_built_with(tmp_path):
    out = run_example("diagnose_run", tmp_path)
    assert "healthy: False" in out
    assert "routing_collapse" in out and "dropped_tokens" in out
    # capacity factor 0.5: every expert keeps at most half its fair share, so at least half is dropped
    assert 0.5 <= number_after("dropped_fraction", out) < 1
    assert "next: tinymoe train --out runs/examples/diagnose-next" in out
    run_dir = tmp_path / "runs/examples/diagnose"
    assert all((run_dir / name).exists() for name in ("checkpoint.npz", "metrics.jsonl", "summary.json"))
    assert run_example("diagnose_run", tmp_path).count("healthy: False") == 1   # --overwrite: it re-runs


# ----- slow examples (TINYMOE_RUN_SLOW_EXAMPLES=1) -----------------------------------------------------------
def routing_table(out):
    """{router name: (val loss, max/mean load, dropped %, experts per token, loads)} of routing_strategies."""
    rows = {}
    for line in out.splitlines():
        match = re.match(r"(.{24}) +([0-9.]+) +([0-9.]+) +([0-9.]+)% +([0-9.]+) +([0-9 ]+)$", line)
        if match:
            loads = [float(value) for value in match.group(6).split()]
            rows[match.group(1).strip()] = tuple(float(match.group(i)) for i in range(2, 6)) + (loads,)
    return rows


@slow
def test_routing_strategies_table(tmp_path):
    rows = routing_table(run_example("routing_strategies", tmp_path))
    assert len(rows) == 10, rows
    for name, (val_loss, ratio, dropped, per_token, loads) in rows.items():
        assert math.isfinite(val_loss) and 0 < val_loss < 4.0, name            # below a 41-symbol uniform guess
        assert ratio == pytest.approx(max(loads) / (sum(loads) / len(loads)), abs=0.02), name
        assert 0 <= dropped < 100
    for name in ("softmax, no aux loss", "softmax + aux loss", "+ sequence balance", "noisy top-k",
                 "sigmoid + aux-free bias", "+ groups (2, best 1)"):
        assert rows[name][3] == 2.0, name                                     # top-2 token choice: exactly 2
    assert rows["expert choice"][1] == 1.0                                    # balanced by construction
    assert 1.0 <= rows["top-p (p=0.5)"][3] <= 2.0                            # 1..top_k experts
    assert 0.0 <= rows["null experts (m=2)"][3] < 2.0                         # a null choice computes nothing
    assert rows["softmax, no aux loss"][1] > rows["softmax + aux loss"][1]    # the aux loss evens the load
    assert (tmp_path / "runs/examples/routing_strategies.png").exists()


@slow
def test_adaptive_compute_counts_between_one_and_top_k(tmp_path):
    out = run_example("adaptive_compute", tmp_path)
    rows = re.findall(r"^(digit|letter|space|punctuation) +(\d+) +([0-9. ]+)$", out, flags=re.M)
    assert [name for name, _, _ in rows] == ["digit", "letter", "space", "punctuation"], out
    top_k = int(re.search(r"at most (\d+)\)", out).group(1))
    for _, _, means in rows:
        assert all(1.0 <= float(value) <= top_k for value in means.split())
    assert (tmp_path / "runs/examples/adaptive_compute.png").exists()


@slow
def test_mixture_of_local_experts_fits_and_splits_the_line(tmp_path):
    out = run_example("mixture_of_local_experts", tmp_path)
    assert number_after("mean squared error of the blend on the grid:", out) < 0.05
    assert len(re.findall(r"expert \d+ leads on", out)) >= 2
    assert (tmp_path / "runs/examples/local_experts.png").exists()


@slow
def test_upcycle_dense_preserves_the_function_at_the_branch(tmp_path):
    out = run_example("upcycle_dense", tmp_path)
    pretrained = number_after("validation loss", out.splitlines()[0])
    branches = [float(value) for value in re.findall(r"validation loss ([0-9.]+) at the branch", out)]
    assert len(branches) == 2 and all(value == pretrained for value in branches)   # upcycling changes nothing yet
    assert all(value < pretrained for value in map(float, re.findall(r"([0-9.]+) after \d+ more steps", out)))


@slow
def test_sparse_vs_dense_both_beat_the_unigram_baseline(tmp_path):
    out = run_example("sparse_vs_dense", tmp_path)
    pairs = re.findall(r"validation loss ([0-9.]+) \(unigram baseline ([0-9.]+)\)", out)
    assert len(pairs) == 2 and all(float(loss) < float(baseline) for loss, baseline in pairs)
    assert (tmp_path / "runs/examples/sparse_vs_dense.png").exists()
