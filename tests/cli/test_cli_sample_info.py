"""`tinymoe sample`, `info`, `gradcheck` and `--help` run as a user runs them; the console script."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tinymoe import __version__ as tinymoe_version
from tinymoe.selfcheck import CASES

from cli_helpers import GPU, TEXT, TINY, assert_ok, environment, tinymoe


# ----- sample ------------------------------------------------------------------------------------------------
def test_sample_prints_the_prompt_and_the_requested_length(trained):
    out, _ = trained
    result = tinymoe("sample", "--checkpoint", out, "--prompt", "the cat", "--length", "25", "--seed", "1",
                     cwd=out.parent)
    assert_ok(result)
    assert result.stdout.endswith("\n")
    text = result.stdout[:-1]
    assert text.startswith("the cat")
    assert len(text) == len("the cat") + 25
    assert set(text) <= set(TEXT)


def test_sample_without_prompt_and_from_the_file(trained):
    out, _ = trained
    result = tinymoe("sample", "--checkpoint", out / "checkpoint.npz", "--length", "10", cwd=out.parent)
    assert_ok(result)
    assert len(result.stdout[:-1]) == 10


def test_sample_is_deterministic_and_top_k_1_is_greedy(trained):
    out, _ = trained
    base = ["sample", "--checkpoint", out, "--prompt", "the ", "--length", "12"]
    first = tinymoe(*base, "--seed", "3", "--temperature", "1.5", cwd=out.parent)
    again = tinymoe(*base, "--seed", "3", "--temperature", "1.5", cwd=out.parent)
    assert_ok(first)
    assert first.stdout == again.stdout
    greedy = [tinymoe(*base, "--seed", seed, "--top-k", "1", cwd=out.parent).stdout for seed in ("1", "2")]
    assert greedy[0] == greedy[1]


def test_sample_defaults_to_the_directory_train_writes(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "runs" / "tinymoe")
    result = tinymoe("sample", "--length", "7", cwd=tmp_path)
    assert_ok(result)
    assert len(result.stdout[:-1]) == 7


def test_sample_temperature_0_is_greedy(trained):
    out, _ = trained
    base = ["sample", "--checkpoint", out, "--prompt", "the ", "--length", "12", "--temperature", "0"]
    greedy = [tinymoe(*base, "--seed", seed, cwd=out.parent) for seed in ("1", "2")]
    assert_ok(greedy[0])
    assert greedy[0].stdout == greedy[1].stdout  # no randomness left
    top_1 = tinymoe("sample", "--checkpoint", out, "--prompt", "the ", "--length", "12", "--top-k", "1", cwd=out.parent)
    assert greedy[0].stdout == top_1.stdout  # the most likely character each time


# ----- info and gradcheck ------------------------------------------------------------------------------------
def test_info_prints_versions_devices_and_kernels(tmp_path):
    result = tinymoe("info", cwd=tmp_path)
    assert_ok(result)
    rows = {line.split()[0] if not line.startswith("kernel") else " ".join(line.split()[:2]): line
            for line in result.stdout.splitlines() if line.strip()}
    assert tinymoe_version in rows["tinymoe"]
    assert np.__version__ in rows["numpy"]
    assert "python" in rows and "cuda" in rows
    assert "unavailable" in rows["cuda"] or "device" in rows["cuda"]
    assert "numpy" in rows["kernels (cpu)"] and "chosen numpy" in rows["kernels (cpu)"]  # TINYMOE_KERNELS=numpy
    assert "numpy" in rows["kernel choice"]


def test_info_reports_a_bad_tinymoe_kernels_and_sets_no_environment(tmp_path):
    result = tinymoe("info", cwd=tmp_path, TINYMOE_KERNELS="fastest")
    assert_ok(result)
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("kernel choice")]
    assert "TINYMOE_KERNELS='fastest' is not a kernel implementation" in row
    env = environment(TINYMOE_KERNELS="numpy")
    env.pop("OMP_WAIT_POLICY", None)
    probe = ("import os; from tinymoe.cli.main import main; main(['info']); "
             "print('OMP', os.environ.get('OMP_WAIT_POLICY'))")
    plain = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip().splitlines()[-1] == "OMP None"  # the command sets no variable (no OpenMP is used)


def test_gradcheck_passes_every_case_and_prints_a_table(tmp_path):
    result = tinymoe("gradcheck", cwd=tmp_path)
    assert_ok(result)
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith(f"{len(CASES)} passed, 0 failed")
    table = lines[1:-1]
    assert len(table) == len(CASES)
    for name, line in zip(CASES, table):
        assert line.startswith(name) and " ok " in line


@GPU
def test_gradcheck_on_cuda_passes_every_case(tmp_path):
    result = tinymoe("gradcheck", "--device", "cuda", cwd=tmp_path, timeout=600, TINYMOE_KERNELS="auto")
    assert_ok(result)
    assert result.stdout.strip().splitlines()[-1].startswith(f"{len(CASES)} passed, 0 failed")


@GPU
def test_train_and_sample_on_cuda(tmp_path):
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    result = tinymoe("train", "--data", "data.txt", "--steps", "4", "--out", "run", "--device", "cuda",
                     "--matmul-precision", "tf32", *TINY,
                     cwd=tmp_path, timeout=600, TINYMOE_KERNELS="auto")
    assert_ok(result)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"] == "cuda" and np.isfinite(summary["val_loss"])
    sampled = tinymoe("sample", "--checkpoint", "run", "--device", "cuda", "--length", "5", "--prompt", TEXT[:3],
                      cwd=tmp_path, TINYMOE_KERNELS="auto")
    assert_ok(sampled)
    assert sampled.stdout.startswith(TEXT[:3])


def test_console_script_is_installed(tmp_path):
    script = shutil.which("tinymoe", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("no tinymoe console script beside this Python")
    result = subprocess.run([script, "info"], cwd=tmp_path, env=environment(), capture_output=True, text=True,
                            timeout=60)
    assert_ok(result)
    assert result.stdout.startswith("tinymoe")


def test_help_lists_the_commands(tmp_path):
    result = tinymoe("--help", cwd=tmp_path)
    assert_ok(result)
    for command in ("train", "sample", "gradcheck", "info"):
        assert command in result.stdout
