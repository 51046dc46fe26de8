"""The `tinymoe` command line, run as a user runs it: `python -m tinymoe ...` in a subprocess, tiny sizes,
TINYMOE_KERNELS=numpy (no Numba compile time). Checks the files `train` writes and their fields, `sample`,
`info`, `gradcheck`, resume (also after a real Ctrl-C), and that every mistake a user can make gives exactly one
line on stderr starting with "tinymoe", no traceback, and a non-zero exit status."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tinymoe import __version__ as tinymoe_version
from tinymoe.engine.backend import cuda_available
from tinymoe.selfcheck import CASES
from tinymoe.train.checkpoint import load_checkpoint
from tinymoe.train.data import CharData

TINY = ["--eval-every", "2", "--d-model", "16", "--layers", "1", "--heads", "2", "--seq-len", "16", "--d-ff", "16",
        "--batch-size", "4", "--eval-batches", "1"]
METRIC_FIELDS = {"step", "train_loss", "val_loss", "aux_loss", "z_loss", "tokens_per_second", "tokens_per_expert",
                 "dropped_fraction"}
SUMMARY_FIELDS = {"val_loss", "unigram_loss", "steps", "seconds", "device"}
TIMING_FIELDS = {"tokens_per_second"}


def environment(**extra):
    env = dict(os.environ, TINYMOE_KERNELS="numpy", MPLBACKEND="Agg", PYTHONIOENCODING="utf-8", **extra)
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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    (directory / "data.txt").write_text(TEXT, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def trained(workdir):
    """One tiny `tinymoe train` run shared by the tests that read its outputs (4 steps, evals at 2 and 4)."""
    result = tinymoe("train", "--data", "data.txt", "--steps", "4", "--out", "run", *TINY, cwd=workdir)
    assert_ok(result)
    return workdir / "run", result


# ----- train -------------------------------------------------------------------------------------------------
def test_train_writes_every_file(trained):
    out, result = trained
    assert {"checkpoint.npz", "metrics.jsonl", "summary.json", "loss.png", "expert_load.png"} <= set(os.listdir(out))
    for name in ("loss.png", "expert_load.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary files left
    assert result.stderr == ""


def test_train_metrics_have_the_documented_fields(trained):
    out, _ = trained
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert METRIC_FIELDS <= set(row)
        for key in ("train_loss", "val_loss", "aux_loss", "z_loss", "tokens_per_second"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
        (per_expert,) = row["tokens_per_expert"]  # one MoE layer
        assert len(per_expert) == 4  # default --experts 4
        assert sum(per_expert) == 2 * 4 * 16 * 2  # eval window of 2 steps x batch 4 x seq 16 x top-2
        assert row["dropped_fraction"] == [0.0]


def test_train_summary_has_the_documented_fields(trained, workdir):
    out, _ = trained
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["steps"] == 4
    assert summary["device"] == "cpu"
    assert summary["seconds"] > 0
    assert summary["val_loss"] == read_metrics(out)[-1]["val_loss"]
    expected_unigram = CharData.from_text(TEXT, seq_len=16).unigram_loss()
    assert summary["unigram_loss"] == pytest.approx(expected_unigram, rel=1e-9)


def test_train_progress_is_plain_lines_in_a_pipe(trained):
    _, result = trained
    assert "\r" not in result.stdout and "\033" not in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("step 1/4") for line in lines)
    assert any(line.startswith("step 4/4") for line in lines)
    assert any("eval at step 2" in line for line in lines) and any("eval at step 4" in line for line in lines)


def test_train_progress_rewrites_one_line_on_a_terminal(workdir, tmp_path):
    pty = pytest.importorskip("pty")
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "tinymoe", "train", "--data", str(workdir / "data.txt"),
                                "--steps", "4", "--out", "run", *TINY], cwd=tmp_path, env=environment(),
                               stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=60) == 0, process.stderr.read()
    process.stderr.close()
    output = b"".join(chunks).decode()
    assert output.count("\r[") >= 4  # the bar is redrawn in place at every step
    assert "4/4" in output


def test_checkpoint_of_a_cli_run_holds_the_run(trained):
    out, _ = trained
    checkpoint = load_checkpoint(out / "checkpoint.npz")
    assert checkpoint.meta["step"] == 4
    assert checkpoint.meta["vocab"] == "".join(sorted(set(TEXT)))
    assert checkpoint.meta["model_config"]["d_model"] == 16
    assert checkpoint.optimizer_state["step_count"] == 4


OPTION_CASES = {
    "sigmoid": (["--router", "sigmoid", "--bias-update-rate", "0.01", "--shared-experts", "1", "--capacity-factor",
                 "1.5", "--activation", "gelu", "--layers", "2", "--moe-layers", "1", "--experts", "3", "--top-k",
                 "1", "--no-normalize-top-k", "--jitter", "0.1", "--aux-coef", "0.02", "--z-coef", "0.002",
                 "--dropout", "0.1", "--dtype", "float64"],
                dict(router="sigmoid", bias_update_rate=0.01, n_shared_experts=1, capacity_factor=1.5,
                     activation="gelu", n_layers=2, moe_layers=[1], n_experts=3, top_k=1, normalize_top_k=False,
                     jitter=0.1, aux_coef=0.02, z_coef=0.002, dropout=0.1, dtype="float64")),
    "noisy": (["--router", "noisy", "--noisy-coef", "0.05", "--experts", "5", "--activation", "relu"],
              dict(router="noisy", noisy_coef=0.05, n_experts=5, activation="relu", moe_layers=["all"])),
    "expert choice": (["--router", "expert_choice", "--activation", "silu", "--moe-layers", "all"],
                      dict(router="expert_choice", activation="silu")),
}


@pytest.mark.parametrize("flags, expected", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_moe_options_reach_the_model_config(workdir, tmp_path, flags, expected):
    result = tinymoe("train", "--data", workdir / "data.txt", "--steps", "2", "--out", tmp_path / "run", *TINY, *flags,
                     cwd=tmp_path)
    assert_ok(result)
    config = load_checkpoint(tmp_path / "run" / "checkpoint.npz").meta["model_config"]
    for key, value in expected.items():
        assert config[key] == value, key
    row = read_metrics(tmp_path / "run")[-1]
    n_moe = 1 if expected.get("moe_layers") == [1] else config["n_layers"]
    assert len(row["tokens_per_expert"]) == n_moe
    assert all(len(layer) == config["n_experts"] for layer in row["tokens_per_expert"])


def test_fresh_run_starts_a_fresh_metrics_log(workdir, tmp_path):
    for _ in range(2):
        assert_ok(tinymoe("train", "--data", workdir / "data.txt", "--steps", "2", "--out", "run", *TINY, cwd=tmp_path))
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [2]


# ----- resume ------------------------------------------------------------------------------------------------
def test_resume_continues_from_the_checkpoint_step(workdir, tmp_path):
    common = ["train", "--data", workdir / "data.txt", "--out", "run", *TINY]
    assert_ok(tinymoe(*common, "--steps", "2", cwd=tmp_path))
    result = tinymoe(*common, "--steps", "6", "--resume", cwd=tmp_path)
    assert_ok(result)
    assert "resuming from step 2" in result.stdout
    assert not any(line.startswith("step 1/6") for line in result.stdout.splitlines())
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [2, 4, 6]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(workdir, tmp_path):
    args = ["train", "--data", str(workdir / "data.txt"), "--steps", "80", "--warmup", "3", "--dropout", "0.1",
            "--jitter", "0.1", *TINY]
    straight = tinymoe(*args, "--out", "straight", cwd=tmp_path)
    assert_ok(straight)

    process = subprocess.Popen([sys.executable, "-m", "tinymoe", *args, "--out", "resumed"], cwd=tmp_path,
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("eval at step 4"):
                process.send_signal(signal.SIGINT)
                break
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip() == "tinymoe: interrupted"
    interrupted_rows = read_metrics(tmp_path / "resumed")
    assert interrupted_rows[-1]["step"] < 80

    resumed = tinymoe(*args, "--out", "resumed", "--resume", cwd=tmp_path)
    assert_ok(resumed)
    assert "resuming from step" in resumed.stdout
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(read_metrics(tmp_path / "straight"))
    final = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz").model_state
    for name, value in load_checkpoint(tmp_path / "straight" / "checkpoint.npz").model_state.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


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


# ----- user errors: one line, no traceback -------------------------------------------------------------------
def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


TRAIN_ERRORS = {
    "missing data": (lambda d: ["--data", d / "missing.txt"], "missing.txt"),
    "empty data": (lambda d: ["--data", _write(d / "empty.txt", "")], "empty"),
    "binary data": (lambda d: ["--data", _write(d / "data.bin", bytes(range(256)) * 8)], "binary"),
    "not utf-8": (lambda d: ["--data", _write(d / "latin1.txt", ("caf\xe9 " * 200).encode("latin-1"))], "UTF-8"),
    "too short": (lambda d: ["--data", _write(d / "short.txt", "tiny text")], "short"),
    "data is a directory": (lambda d: ["--data", d], "--data"),
    "cuda without cupy": pytest.param(lambda d: ["--data", d / "data.txt", "--device", "cuda"], "cuda", marks=NO_GPU),
    "out under a file": (lambda d: ["--data", d / "data.txt", "--out", _write(d / "plain", "x") / "run"], "--out"),
    "out is a file": (lambda d: ["--data", d / "data.txt", "--out", _write(d / "plain2", "x")], "--out"),
    "heads do not divide": (lambda d: ["--data", d / "data.txt", "--heads", "3"], "n_heads"),
    "top-k above experts": (lambda d: ["--data", d / "data.txt", "--top-k", "5"], "top_k"),
    "moe layer out of range": (lambda d: ["--data", d / "data.txt", "--moe-layers", "3"], "moe_layers"),
    "moe layers not integers": (lambda d: ["--data", d / "data.txt", "--moe-layers", "first"], "--moe-layers"),
    "bias rate without sigmoid": (lambda d: ["--data", d / "data.txt", "--bias-update-rate", "0.1"], "bias_update_rate"),
    "resume without checkpoint": (lambda d: ["--data", d / "data.txt", "--out", d / "fresh", "--resume"], "checkpoint"),
}


@pytest.mark.parametrize("make_args, fragment", TRAIN_ERRORS.values(), ids=TRAIN_ERRORS.keys())
def test_train_user_errors_are_one_line(workdir, tmp_path, make_args, fragment):
    shutil.copy(workdir / "data.txt", tmp_path / "data.txt")
    args = ["train", "--steps", "2", "--out", tmp_path / "run", *TINY, *make_args(tmp_path)]
    result = tinymoe(*args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert "step 1/" not in result.stdout  # nothing trained


def test_resume_with_another_config_is_one_line(trained, tmp_path):
    out, _ = trained
    shutil.copytree(out, tmp_path / "run")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    result = tinymoe("train", "--data", "data.txt", "--steps", "6", "--out", "run", *TINY, "--d-model", "32",
                     "--resume", cwd=tmp_path)
    assert_one_line_error(result, "d_model")


ARGPARSE_ERRORS = {
    "steps 0": ["train", "--steps", "0"],
    "steps not a number": ["train", "--steps", "many"],
    "unknown matmul precision": ["train", "--matmul-precision", "fast"],
    "sample length 0": ["sample", "--checkpoint", "run", "--length", "0"],
    "sample temperature 0": ["sample", "--checkpoint", "run", "--temperature", "0"],
}


@pytest.mark.parametrize("args", ARGPARSE_ERRORS.values(), ids=ARGPARSE_ERRORS.keys())
def test_argument_errors_are_one_line(tmp_path, args):
    assert_one_line_error(tinymoe(*args, cwd=tmp_path))


def test_argument_errors_name_the_argument_and_exit_2(tmp_path):
    result = tinymoe("train", "--steps", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tinymoe train: error: argument --steps")


def _truncated_checkpoint(trained, directory):
    raw = (trained[0] / "checkpoint.npz").read_bytes()
    return _write(directory / "truncated.npz", raw[: len(raw) // 2])


SAMPLE_ERRORS = {
    "unknown prompt characters": (lambda trained, d: ["--checkpoint", trained[0], "--prompt", "ZQ#"], "Q"),
    "missing checkpoint": (lambda trained, d: ["--checkpoint", d / "nothing"], "nothing"),
    "truncated checkpoint": (lambda trained, d: ["--checkpoint", _truncated_checkpoint(trained, d)], "truncated"),
    "text file as checkpoint": (lambda trained, d: ["--checkpoint", _write(d / "notes.txt", "hello\n")], "notes.txt"),
    "cuda without cupy": pytest.param(lambda trained, d: ["--checkpoint", trained[0], "--device", "cuda"], "cuda",
                                      marks=NO_GPU),
}


@pytest.mark.parametrize("make_args, fragment", SAMPLE_ERRORS.values(), ids=SAMPLE_ERRORS.keys())
def test_sample_user_errors_are_one_line(trained, tmp_path, make_args, fragment):
    result = tinymoe("sample", *make_args(trained, tmp_path), "--length", "5", cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


def test_sample_with_an_npy_file_names_it(tmp_path):
    with open(tmp_path / "weights.npy", "wb") as handle:
        np.save(handle, np.ones(3))
    assert_one_line_error(tinymoe("sample", "--checkpoint", tmp_path / "weights.npy", cwd=tmp_path), "weights.npy")


def test_sample_with_a_corrupt_zip_directory_is_one_line(trained, tmp_path):
    raw = bytearray((trained[0] / "checkpoint.npz").read_bytes())
    directory = raw.index(b"PK\x01\x02")  # the first central-directory entry
    raw[directory + 10] ^= 0xFF  # its compression method
    path = _write(tmp_path / "checkpoint.npz", bytes(raw))
    with zipfile.ZipFile(path) as archive:  # the archive still opens: only reading a member fails
        assert archive.namelist()
    assert_one_line_error(tinymoe("sample", "--checkpoint", path, cwd=tmp_path))


@NO_GPU
def test_gradcheck_cuda_without_cupy_is_one_line(tmp_path):
    assert_one_line_error(tinymoe("gradcheck", "--device", "cuda", cwd=tmp_path), "cuda")


FAKE_CUPY = {
    "no device": "def getDeviceCount():\n    return 0\n",
    "no driver": "def getDeviceCount():\n    raise RuntimeError('cudaErrorInsufficientDriver')\n",
}


@pytest.mark.parametrize("runtime", FAKE_CUPY.values(), ids=FAKE_CUPY.keys())
def test_cuda_with_cupy_but_no_gpu_is_one_line(workdir, tmp_path, runtime):
    """A stand-in `cupy` package that imports but finds no usable device (CuPy installed on a CPU machine)."""
    package = tmp_path / "fake" / "cupy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '99.0-fake'\nfrom . import cuda\n")
    (package / "cuda.py").write_text("class runtime:\n" + "".join(
        "    " + line + "\n" for line in ["@staticmethod", *runtime.splitlines()]))
    fake = {"PYTHONPATH": str(tmp_path / "fake")}
    result = tinymoe("train", "--data", workdir / "data.txt", "--steps", "2", "--out", tmp_path / "run", "--device",
                     "cuda", *TINY, cwd=tmp_path, **fake)
    assert_one_line_error(result, "CUDA device")
    assert_one_line_error(tinymoe("gradcheck", "--device", "cuda", cwd=tmp_path, **fake), "CUDA device")
    info = tinymoe("info", cwd=tmp_path, **fake)
    assert_ok(info)
    assert "99.0-fake" in info.stdout
    (cuda_row,) = [line for line in info.stdout.splitlines() if line.startswith("cuda ")]
    assert "unavailable" in cuda_row and "CUDA device" in cuda_row
    assert "kernels (cuda)" not in info.stdout


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
