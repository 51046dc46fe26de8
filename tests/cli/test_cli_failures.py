"""Failures in the middle of `tinymoe train`, run in-process so they can be staged: divergence, a full disk, an
internal bug. Each is one line on stderr, a non-zero exit, and the last good checkpoint left as it was."""
import errno
import math

import pytest

import tinymoe
from tinymoe.cli import main
from tinymoe.models import MoETransformer
from tinymoe.train import loop
from tinymoe.train.checkpoint import load_checkpoint

from cli_helpers import TEXT, TINY


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


@pytest.fixture
def train_args(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "plot_run", lambda metrics, summary, out_dir: [])
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    return ["train", "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "run"), *TINY]


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_divergence_names_the_step_suggests_a_lower_lr_and_keeps_the_last_good_checkpoint(train_args, tmp_path,
                                                                                         monkeypatch, capsys):
    real_loss, calls = MoETransformer.loss, []

    def loss_that_diverges_at_step_3(self, tokens, targets):
        total, parts = real_loss(self, tokens, targets)
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                return total * math.nan, dict(parts, total=math.nan)
        return total, parts

    monkeypatch.setattr(MoETransformer, "loss", loss_that_diverges_at_step_3)
    assert main([*train_args, "--steps", "6"]) == 1
    line = one_error_line(capsys)
    assert line.startswith("tinymoe train: error: training diverged") and "step 3" in line and "lower --lr" in line
    assert "step 2" in line  # the checkpoint kept
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz").meta["step"] == 2


def test_non_finite_weights_are_never_saved(train_args, tmp_path, monkeypatch, capsys):
    real_step, steps = tinymoe.optim.AdamW.step, []

    def step_that_breaks_a_weight_at_step_3(self):
        real_step(self)
        steps.append(1)
        if len(steps) == 3:
            self.parameters()[0].data[...] = math.inf

    monkeypatch.setattr(tinymoe.optim.AdamW, "step", step_that_breaks_a_weight_at_step_3)
    assert main([*train_args, "--steps", "6", "--checkpoint-every", "1"]) == 1
    assert "non-finite" in one_error_line(capsys)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert checkpoint.meta["step"] == 2
    assert all(math.isfinite(float(value.sum())) for value in checkpoint.model_state.values())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk full", "read-only"])
def test_a_failed_save_names_the_file_and_keeps_the_last_checkpoint(train_args, tmp_path, monkeypatch, capsys, code):
    real_save, saves = loop.save_checkpoint, []

    def save_that_fails_the_second_time(path, *args):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(code, "simulated")
        return real_save(path, *args)

    monkeypatch.setattr(loop, "save_checkpoint", save_that_fails_the_second_time)
    assert main([*train_args, "--steps", "6"]) == 1
    line = one_error_line(capsys)
    path = str(tmp_path / "run" / "checkpoint.npz")
    assert f"cannot write {path}" in line and "step 2" in line
    assert load_checkpoint(path).meta["step"] == 2


def test_a_failed_metrics_append_is_one_line(train_args, tmp_path, monkeypatch, capsys):
    def full_disk(path, row):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "append_metrics", full_disk)
    assert main([*train_args, "--steps", "2"]) == 1
    line = one_error_line(capsys)
    assert "metrics.jsonl" in line and "No space left on device" in line


def test_an_internal_bug_is_reported_as_one_and_not_as_a_user_error(train_args, monkeypatch, capsys):
    def broken_run(self):
        raise KeyError("moe_layers")

    monkeypatch.setattr(loop.Trainer, "run", broken_run)
    assert main([*train_args, "--steps", "2"]) == 70
    line = one_error_line(capsys)
    assert line.startswith("tinymoe train: internal error: KeyError") and "please report" in line
    assert "TINYMOE_DEBUG=1" in line
    monkeypatch.setenv("TINYMOE_DEBUG", "1")
    with pytest.raises(KeyError):
        main([*train_args, "--steps", "2", "--overwrite"])


def test_tinymoe_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYMOE_DEBUG", "1")
    with pytest.raises(Exception, match="missing.txt"):
        main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")])
