"""Running `tinymoe` as a user does (`python -m tinymoe ...` in a subprocess, TINYMOE_KERNELS=numpy, tiny
sizes) and checking what it prints: shared by the tests/cli modules."""

import json
import os
import subprocess
import sys

import pytest

from tinymoe.engine.backend import cuda_available


TINY = ["--eval-every", "2", "--d-model", "16", "--layers", "1", "--heads", "2", "--seq-len", "16", "--d-ff", "16",
        "--batch-size", "4", "--eval-batches", "1"]
METRIC_FIELDS = {"step", "train_loss", "val_loss", "aux_loss", "z_loss", "tokens_per_second", "tokens_per_expert",
                 "dropped_fraction"}
SUMMARY_FIELDS = {"val_loss", "unigram_loss", "steps", "seconds", "device"}
TIMING_FIELDS = {"tokens_per_second"}


def environment(**extra):
    env = dict(os.environ, TINYMOE_KERNELS="numpy", MPLBACKEND="Agg", PYTHONIOENCODING="utf-8")
    env.update(extra)
    env.pop("TINYMOE_DEBUG", None)
    return env


def tinymoe(*args, cwd, timeout=120, **extra_env):
    return subprocess.run([sys.executable, "-m", "tinymoe", *map(str, args)], cwd=cwd, env=environment(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


NO_GPU = pytest.mark.skipif(cuda_available(), reason="checks the error given where CuPy or a GPU is missing")
GPU = pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tinymoe"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def without_timing(rows):
    return [{key: value for key, value in row.items() if key not in TIMING_FIELDS} for row in rows]


TEXT = "".join(f"the {animal} sees {count} {thing}.\n" for animal in ("cat", "dog", "owl", "fox")
               for count in range(12) for thing in ("trees", "stones", "rivers"))
