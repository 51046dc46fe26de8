"""`tinymoe train` and resume, run as a user runs them: the files train writes and their fields, progress,
the MoE options reaching the checkpoint's config, resume (also after a real Ctrl-C)."""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinymoe.train.checkpoint import load_checkpoint
from tinymoe.train.data import CharData

from cli_helpers import (METRIC_FIELDS, SUMMARY_FIELDS, TEXT, TINY, assert_ok, assert_one_line_error, environment,
                         read_metrics, tinymoe, without_timing)


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
    model_config = load_checkpoint(tmp_path / "run" / "checkpoint.npz").meta["model_config"]
    config = {**model_config, **model_config["moe"]}  # the MoE options are nested under "moe"
    assert config["d_model"] == model_config["d_model"] and config["dtype"] == model_config["dtype"]
    for key, value in expected.items():
        assert config[key] == value, key
    row = read_metrics(tmp_path / "run")[-1]
    n_moe = 1 if expected.get("moe_layers") == [1] else config["n_layers"]
    assert len(row["tokens_per_expert"]) == n_moe
    assert all(len(layer) == config["n_experts"] for layer in row["tokens_per_expert"])


def test_train_refuses_an_out_dir_holding_a_run_unless_overwrite(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    before = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    common = ["train", "--data", "data.txt", "--steps", "2", "--out", "run", *TINY]
    refused = tinymoe(*common, cwd=tmp_path)
    assert_one_line_error(refused, "already holds a training run", "step 4", "--resume", "--overwrite")
    assert refused.returncode == 2
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == before  # saved progress untouched
    (tmp_path / "run" / "checkpoint.npz").unlink()  # a metrics log alone is a run too
    assert_one_line_error(tinymoe(*common, cwd=tmp_path), "metrics.jsonl")
    assert_ok(tinymoe(*common, "--overwrite", cwd=tmp_path))
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [2]  # a fresh log
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz").meta["step"] == 2
    both = tinymoe(*common, "--overwrite", "--resume", cwd=tmp_path)
    assert_one_line_error(both, "--resume", "--overwrite")
    assert both.returncode == 2


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


def test_ctrl_c_saves_the_step_reached_and_the_printed_command_resumes_exactly(workdir, tmp_path):
    """SIGINT right after the first progress line: the checkpoint holds the step the message reports (between
    two evaluations, so the open metrics window is saved too), and running the printed command gives bitwise
    the weights and metrics of the uninterrupted run."""
    args = ["--data", str(workdir / "data.txt"), "--steps", "150", "--warmup", "3", "--dropout", "0.1",
            "--jitter", "0.1", *TINY, "--eval-every", "7", "--dtype", "float64"]
    straight = tinymoe("train", *args, "--out", "straight", cwd=tmp_path)
    assert_ok(straight)

    process = subprocess.Popen([sys.executable, "-m", "tinymoe", "train", *args, "--out", "resumed"], cwd=tmp_path,
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("step "):
                process.send_signal(signal.SIGINT)
                break
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    match = re.fullmatch(r"tinymoe train: interrupted: saved step (\d+) in (\S+); resume with: (.+)", stderr.strip())
    assert match, stderr
    step, path, command = int(match.group(1)), match.group(2), shlex.split(match.group(3))
    assert 1 <= step < 150
    assert load_checkpoint(tmp_path / path).meta["step"] == step
    assert command[:4] == ["tinymoe", "train", "--out", "resumed"] and command[-1] == "--resume"
    assert command[4:-1] == args  # the user's other options, as given

    resumed = tinymoe(*command[1:], cwd=tmp_path)
    assert_ok(resumed)
    assert f"resuming from step {step}" in resumed.stdout
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(read_metrics(tmp_path / "straight"))
    final = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    expected = load_checkpoint(tmp_path / "straight" / "checkpoint.npz")
    assert final.meta["step"] == 150
    for name, value in expected.model_state.items():
        np.testing.assert_array_equal(final.model_state[name], value, err_msg=name)
