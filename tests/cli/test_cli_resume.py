"""`tinymoe train --resume` on a finished or damaged run, with changed options, and the clean-up at start."""
import json
import os
import shutil
import time

import pytest

from tinymoe.train.checkpoint import load_checkpoint

from cli_helpers import TEXT, TINY, assert_ok, assert_one_line_error, read_metrics, tinymoe


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the shared 4-step run (evaluations at 2 and 4) in tmp_path/run, and the options that made it."""
    shutil.copytree(trained[0], tmp_path / "run")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    return tmp_path, ["train", "--data", "data.txt", "--out", "run", *TINY]


def test_resume_at_the_checkpoint_step_trains_nothing_and_exits_0(run_copy):
    cwd, common = run_copy
    before = (cwd / "run" / "checkpoint.npz").read_bytes()
    result = tinymoe(*common, "--steps", "4", "--resume", cwd=cwd)
    assert_ok(result)
    assert "nothing to train" in result.stdout and "already at step 4" in result.stdout
    assert "step 1/" not in result.stdout and "wrote" not in result.stdout
    assert (cwd / "run" / "checkpoint.npz").read_bytes() == before


def test_resume_past_steps_is_a_usage_error(run_copy):
    cwd, common = run_copy
    result = tinymoe(*common, "--steps", "2", "--resume", cwd=cwd)
    assert_one_line_error(result, "already at step 4", "past --steps 2")
    assert result.returncode == 2


def test_resume_refuses_changed_training_settings_and_lists_them(run_copy):
    cwd, common = run_copy
    before = (cwd / "run" / "checkpoint.npz").read_bytes()
    result = tinymoe(*common, "--steps", "6", "--resume", "--lr", "0.5", "--weight-decay", "0.9", "--seed", "7",
                     cwd=cwd)
    assert_one_line_error(result, "cannot change on resume", "lr: checkpoint 0.003 vs given 0.5",
                          "weight_decay: checkpoint 0.01 vs given 0.9", "seed: checkpoint 0 vs given 7")
    assert "batch_size" not in result.stderr  # only what differs
    assert (cwd / "run" / "checkpoint.npz").read_bytes() == before  # nothing recorded


def test_resume_may_change_steps_eval_every_and_checkpoint_every_and_records_them(run_copy):
    cwd, common = run_copy
    result = tinymoe(*common, "--steps", "6", "--eval-every", "3", "--checkpoint-every", "1", "--resume", cwd=cwd)
    assert_ok(result)
    saved = load_checkpoint(cwd / "run" / "checkpoint.npz").meta["train_config"]
    assert (saved["steps"], saved["eval_every"], saved["checkpoint_every"]) == (6, 3, 1)
    assert [row["step"] for row in read_metrics(cwd / "run")] == [2, 4, 6]


@pytest.mark.parametrize("tail", [b'{"step": 6, "train_loss": 1.2', b"\x00" * 300],
                         ids=["torn json", "nul padding"])
def test_resume_skips_a_torn_last_metrics_line_with_one_warning(run_copy, tail):
    cwd, common = run_copy
    with open(cwd / "run" / "metrics.jsonl", "ab") as handle:
        handle.write(tail)
    result = tinymoe(*common, "--steps", "6", "--resume", cwd=cwd)
    assert_ok(result)
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("warning: ") and "metrics.jsonl" in warning and "torn last line 3" in warning
    assert [row["step"] for row in read_metrics(cwd / "run")] == [2, 4, 6]


def test_resume_with_a_damaged_middle_metrics_line_names_file_and_line(run_copy):
    cwd, common = run_copy
    path = cwd / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0][:10] + "\n" + lines[1])
    assert_one_line_error(tinymoe(*common, "--steps", "6", "--resume", cwd=cwd), "metrics.jsonl line 1 is damaged")


def test_resume_with_another_vocabulary_is_one_line(run_copy):
    cwd, common = run_copy
    (cwd / "data.txt").write_text(TEXT.upper(), encoding="utf-8")
    assert_one_line_error(tinymoe(*common, "--steps", "6", "--resume", cwd=cwd), "another vocabulary")


def test_stale_temporaries_are_removed_at_start_and_reported(run_copy):
    cwd, common = run_copy
    stale = cwd / "run" / ".tmp-0123456789abcdef-checkpoint.npz"
    young = cwd / "run" / ".tmp-fedcba9876543210-checkpoint.npz"
    for path in (stale, young):
        path.write_bytes(b"half a checkpoint")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    result = tinymoe(*common, "--steps", "6", "--resume", cwd=cwd)
    assert_ok(result)
    (line,) = [line for line in result.stdout.splitlines() if "stale temporary" in line]
    assert stale.name in line and young.name not in line
    assert not stale.exists() and young.exists()  # a young one may belong to a save in progress
    assert json.loads((cwd / "run" / "summary.json").read_text())["steps"] == 6
