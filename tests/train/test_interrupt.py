"""Ctrl-C during Trainer.run: acted on between two steps, the checkpoint holds that whole step (with the open
metrics window), and resuming from it reproduces the uninterrupted run bitwise."""
import io
import os
import signal

import numpy as np
import pytest

import tinymoe
from tinymoe.train.checkpoint import load_checkpoint
from tinymoe.train.interrupt import TrainingInterrupted
from test_trainer import make_trainer, read_metrics, without_timing


@pytest.fixture(autouse=True)
def numpy_kernels_no_plots(monkeypatch):
    monkeypatch.setattr("tinymoe.train.loop.plot_run", lambda metrics, summary, out_dir: [])
    with tinymoe.kernels.use("numpy"):
        yield


@pytest.fixture(scope="module")
def data():
    from test_trainer import SEQ_LEN, TEXT
    from tinymoe.train.data import CharData

    return CharData.from_text(TEXT, seq_len=SEQ_LEN)


class SigintOn(io.StringIO):
    """A progress stream that sends this process a real SIGINT when it is told `trigger`."""

    def __init__(self, trigger):
        super().__init__()
        self.trigger = trigger

    def write(self, text):
        if self.trigger in text:
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


def assert_same_run(straight, resumed, straight_dir, resumed_dir):
    assert without_timing(read_metrics(resumed_dir)) == without_timing(read_metrics(straight_dir))
    for (name, expected), (_, actual) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        np.testing.assert_array_equal(actual, expected, err_msg=name)


@pytest.mark.parametrize("trigger, step, saved_now", [("step 1/8", 1, True), ("eval at step 4:", 4, False)],
                         ids=["between evaluations", "right after an evaluation"])
def test_sigint_saves_the_step_reached_and_resume_is_exact(data, tmp_path, trigger, step, saved_now):
    options = dict(steps=8, eval_every=4, model_overrides=dict(dropout=0.2, jitter=0.2))
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    straight = make_trainer(data, tmp_path / "straight", **options)
    straight.run()

    interrupted = make_trainer(data, tmp_path / "resumed", stream=SigintOn(trigger), **options)
    with pytest.raises(TrainingInterrupted) as stop:
        interrupted.run()
    assert (stop.value.step, stop.value.saved_now) == (step, saved_now)
    assert stop.value.path == os.path.join(tmp_path / "resumed", "checkpoint.npz")
    assert load_checkpoint(stop.value.path).meta["step"] == step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed = make_trainer(data, tmp_path / "resumed", **options)
    resumed.resume()
    assert resumed.step == step
    resumed.run()
    assert_same_run(straight, resumed, tmp_path / "straight", tmp_path / "resumed")


def test_an_interrupt_inside_a_step_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    trainer = make_trainer(data, tmp_path, steps=6, eval_every=2)
    real_loss, calls = trainer.model.loss, []

    def loss_interrupted_at_step_3(tokens, targets):
        if trainer.model.training:
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt  # mid-step: the batch is drawn, the weights are those of step 2
        return real_loss(tokens, targets)

    monkeypatch.setattr(trainer.model, "loss", loss_interrupted_at_step_3)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.run()
    assert (stop.value.step, stop.value.saved_now) == (2, False)
    assert load_checkpoint(tmp_path / "checkpoint.npz").meta["step"] == 2


def test_an_interrupt_before_the_first_step_saves_nothing(data, tmp_path, monkeypatch):
    trainer = make_trainer(data, tmp_path)
    monkeypatch.setattr(trainer.model, "loss", lambda tokens, targets: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.run()
    assert (stop.value.step, stop.value.path, stop.value.saved_now) == (0, None, False)
    assert not (tmp_path / "checkpoint.npz").exists()
