"""What Trainer.resume refuses (another vocabulary, changed training settings), when checkpoints are written
(checkpoint_every, the time budget), the metrics log after a crash, divergence, the ETA and the compile notice."""
import io
import json

import pytest

import tinymoe
from tinymoe.train import loop
from tinymoe.train.checkpoint import CheckpointError, load_checkpoint
from tinymoe.train.data import CharData
from tinymoe.train.metrics_log import MetricsLogError, read_metrics as read_log
from tinymoe.train.progress import Progress
from test_trainer import SEQ_LEN, TEXT, make_trainer


@pytest.fixture(autouse=True)
def numpy_kernels_no_plots(monkeypatch):
    monkeypatch.setattr(loop, "plot_run", lambda metrics, summary, out_dir: [])
    with tinymoe.kernels.use("numpy"):
        yield


@pytest.fixture(scope="module")
def data():
    return CharData.from_text(TEXT, seq_len=SEQ_LEN)


@pytest.fixture
def two_step_run(data, tmp_path):
    make_trainer(data, tmp_path, steps=2).run()
    return tmp_path


# ----- what resume refuses -------------------------------------------------------------------------------------
def test_resume_with_another_vocabulary_is_a_checkpoint_error(data, two_step_run):
    shuffled = CharData(vocab=data.vocab[::-1], train=data.train, val=data.val)  # same size, other symbols
    with pytest.raises(CheckpointError, match="another vocabulary"):
        make_trainer(shuffled, two_step_run).resume()


@pytest.mark.parametrize("changes", [dict(lr=0.5), dict(weight_decay=0.9, seed=7), dict(batch_size=4),
                                     dict(min_lr=0.0), dict(warmup_steps=5), dict(grad_clip=0.5)])
def test_resume_refuses_changed_training_settings_listing_each(data, two_step_run, changes):
    with pytest.raises(CheckpointError, match="cannot change on resume") as error:
        make_trainer(data, two_step_run, **changes).resume()
    for name, value in changes.items():
        assert f"{name}: checkpoint" in str(error.value) and f"vs given {value!r}" in str(error.value)


def test_resume_may_change_the_reporting_settings(data, two_step_run):
    trainer = make_trainer(data, two_step_run, steps=5, eval_every=5, eval_batches=1, checkpoint_every=1,
                           checkpoint_seconds=3.0)
    trainer.resume()
    trainer.run()
    saved = load_checkpoint(two_step_run / "checkpoint.npz").meta["train_config"]
    assert (saved["steps"], saved["eval_every"], saved["checkpoint_every"]) == (5, 5, 1)  # what was used


# ----- when checkpoints are written ----------------------------------------------------------------------------
@pytest.mark.parametrize("options, saved_at", [(dict(checkpoint_every=3), [2, 3, 4, 6, 8]),
                                               (dict(checkpoint_every=0), [2, 4, 6, 8]),
                                               (dict(checkpoint_seconds=0.0), [1, 2, 3, 4, 5, 6, 7, 8]),
                                               (dict(checkpoint_seconds=1e9), [2, 4, 6, 8])])
def test_checkpoints_are_written_at_evaluations_and_as_configured(data, tmp_path, monkeypatch, options, saved_at):
    trainer = make_trainer(data, tmp_path, steps=8, eval_every=2, **options)
    steps = []
    real_save = trainer.save
    monkeypatch.setattr(trainer, "save", lambda: (steps.append(trainer.step), real_save())[1])
    trainer.run()
    assert steps == saved_at


@pytest.mark.parametrize("bad, error, message", [
    (dict(checkpoint_every=-1), ValueError, "checkpoint_every=-1 must be >= 0"),
    (dict(checkpoint_seconds=-1.0), ValueError, r"checkpoint_seconds=-1.0 must be >= 0"),
    (dict(checkpoint_seconds=float("inf")), TypeError, "checkpoint_seconds=inf must be a finite real number"),
    (dict(lr=float("nan")), TypeError, "lr=nan must be a finite real number"),
    (dict(seed=-1), ValueError, "seed=-1 must be >= 0")])
def test_train_config_rejects_bad_checkpoint_and_number_settings(bad, error, message):
    with pytest.raises(error, match=message):
        loop.TrainConfig(**bad)


# ----- divergence ----------------------------------------------------------------------------------------------
def test_divergence_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    trainer = make_trainer(data, tmp_path, steps=6, eval_every=2)
    real_loss, calls = trainer.model.loss, []

    def loss_nan_at_step_4(tokens, targets):
        total, parts = real_loss(tokens, targets)
        if trainer.model.training:
            calls.append(1)
            if len(calls) == 4:
                return total * float("nan"), dict(parts, total=float("nan"))
        return total, parts

    monkeypatch.setattr(trainer.model, "loss", loss_nan_at_step_4)
    with pytest.raises(loop.DivergenceError, match="step 4") as error:
        trainer.run()
    assert "step 2, is kept" in str(error.value) and "lower --lr" in str(error.value)
    assert load_checkpoint(tmp_path / "checkpoint.npz").meta["step"] == 2


# ----- the metrics log after a crash ---------------------------------------------------------------------------
ROWS = [{"step": 2, "val_loss": 1.5}, {"step": 4, "val_loss": 1.25}]
WHOLE = "".join(json.dumps(row) + "\n" for row in ROWS).encode()


@pytest.mark.parametrize("tail, line", [(b'{"step": 6, "val_lo', 3), (b"\x00" * 64, 3),
                                        (b'{"step": 6, "val_loss": 1.0\x00\x00\x00', 3)],
                         ids=["torn json", "nul padding", "torn and padded"])
def test_a_torn_last_line_is_skipped_with_one_warning(tmp_path, tail, line):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(WHOLE + tail)
    warnings = []
    assert read_log(path, warn=warnings.append) == ROWS
    (warning,) = warnings
    assert f"torn last line {line}" in warning and str(path) in warning and "2 whole line(s) kept" in warning


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(WHOLE[:-1])
    warnings = []
    assert read_log(path, warn=warnings.append) == ROWS and warnings == []
    assert read_log(path, up_to_step=3) == ROWS[:1]


@pytest.mark.parametrize("middle", [b'{"step": 3, "val', b"[1, 2]", b'{"val_loss": 1.0}', b"\x00\x00"],
                         ids=["torn json", "not an object", "no step", "nul bytes"])
def test_a_damaged_line_before_the_last_names_file_and_line(tmp_path, middle):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(WHOLE.replace(b"\n", b"\n" + middle + b"\n", 1))
    with pytest.raises(MetricsLogError, match=r"metrics.jsonl line 2 is damaged"):
        read_log(path)


def test_resume_drops_a_torn_metrics_line_and_warns_once(data, two_step_run):
    with open(two_step_run / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": 4, "tra')
    warnings = io.StringIO()
    trainer = make_trainer(data, two_step_run, steps=4)
    trainer.warning_stream = warnings
    trainer.resume()
    assert warnings.getvalue().count("\n") == 1 and warnings.getvalue().startswith("warning: ")
    trainer.run()
    assert [row["step"] for row in read_log(two_step_run / "metrics.jsonl")] == [2, 4]


# ----- ETA and the compile notice ------------------------------------------------------------------------------
def test_eta_skips_the_first_steps_and_follows_the_recent_ones():
    times = iter([0.0, 9.0, 9.5] + [9.5 + 0.1 * k for k in range(1, 200)])  # step 1 compiles for 9 s
    stream = io.StringIO()
    progress = Progress(100, stream, plain_every=1, clock=lambda: next(times), window=5)
    progress.update(1, 2.0, 1.0, 100.0)
    assert "ETA --:--" in stream.getvalue()  # nothing timed yet
    progress.update(2, 2.0, 1.0, 100.0)
    for step in range(3, 11):
        progress.update(step, 2.0, 1.0, 100.0)
    assert progress.eta(10) == pytest.approx(90 * 0.1)  # not 90 x (10 s / 10 steps)
    assert stream.getvalue().splitlines()[-1].endswith("ETA 0:09")


def test_eta_shows_hours():
    times = iter([0.0, 1.0, 2.0, 12.0])
    stream = io.StringIO()
    progress = Progress(1000, stream, plain_every=1, clock=lambda: next(times), skip=0)
    for step in (1, 2, 3):
        progress.update(step, 2.0, 1.0, 100.0)
    assert stream.getvalue().splitlines()[-1].endswith("ETA 1:06:28")  # 997 steps x 4 s = 3988 s


@pytest.mark.parametrize("chosen, first, shown", [("numba", True, True), ("numba", False, False),
                                                  ("numpy", True, False)])
def test_compile_notice_before_the_first_numba_step(data, tmp_path, monkeypatch, chosen, first, shown):
    monkeypatch.setattr(loop, "_FIRST_STEP_OF_PROCESS", first)
    monkeypatch.setattr(loop.kernels, "chosen", lambda device: chosen)
    stream = io.StringIO()
    make_trainer(data, tmp_path, stream=stream, steps=2).run()
    lines = stream.getvalue().splitlines()
    assert (lines[0] == "compiling kernels (first run only)...") == shown
    assert loop._FIRST_STEP_OF_PROCESS is False
