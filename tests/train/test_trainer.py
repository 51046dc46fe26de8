"""The Trainer: files it writes, what metrics.jsonl and summary.json hold, exact resume after an interruption,
the progress line, and its argument checks."""
import io
import json
import math
import os

import numpy as np
import pytest

from tinymoe.models.transformer import FLAT_MOE_KEYS

import tinymoe
from tinymoe.models import TransformerConfig
from tinymoe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinymoe.train.data import CharData
from tinymoe.train.loop import TrainConfig, Trainer
from tinymoe.train.progress import Progress
from transformer_helpers import split_options

TEXT = "".join(f"{a} + {b} = {a + b}\n" for a in range(20) for b in range(0, 20, 3))
SEQ_LEN, BATCH = 8, 3
METRIC_FIELDS = {"step", "train_loss", "val_loss", "aux_loss", "z_loss", "tokens_per_second", "tokens_per_expert",
                 "dropped_fraction"}
TIMING_FIELDS = {"tokens_per_second"}


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


@pytest.fixture(autouse=True)
def skip_plots_for_speed(request, monkeypatch):
    """Drawing the PNGs costs ~0.3 s a run; only the test about the written files draws them."""
    if "plots" not in request.node.name:
        monkeypatch.setattr("tinymoe.train.loop.plot_run", lambda metrics, summary, out_dir: [])


@pytest.fixture(scope="module")
def data():
    return CharData.from_text(TEXT, seq_len=SEQ_LEN)


def make_trainer(data, out_dir, stream=None, model_overrides=None, **train_overrides):
    model_values = dict(vocab_size=len(data.vocab), d_model=8, n_layers=2, n_heads=2, max_seq_len=SEQ_LEN, d_ff=8,
                        n_experts=3, top_k=2)
    model_values.update(model_overrides or {})
    train_values = dict(steps=6, batch_size=BATCH, seq_len=SEQ_LEN, eval_every=2, eval_batches=2, warmup_steps=2,
                        lr=1e-2, min_lr=1e-3)
    train_values.update(train_overrides)
    return Trainer(TransformerConfig(**split_options(model_values)), TrainConfig(**train_values), data, str(out_dir),
                   stream=stream or io.StringIO())


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def without_timing(rows):
    return [{key: value for key, value in row.items() if key not in TIMING_FIELDS} for row in rows]


class InterruptAtEval(io.StringIO):
    """A progress stream that raises KeyboardInterrupt when it is told about the evaluation at `step` — after
    that evaluation's checkpoint is written, like a Ctrl-C at that moment."""

    def __init__(self, step):
        super().__init__()
        self.trigger = f"eval at step {step}:"

    def write(self, text):
        if self.trigger in text:
            raise KeyboardInterrupt
        return super().write(text)


# ----- outputs -----------------------------------------------------------------------------------------------
def test_run_writes_checkpoint_metrics_summary_and_plots(data, tmp_path):
    summary = make_trainer(data, tmp_path).run()
    files = set(os.listdir(tmp_path))
    assert {"checkpoint.npz", "metrics.jsonl", "summary.json"} <= files
    assert {"loss.png", "expert_load.png"} <= files  # matplotlib is installed here
    for name in ("loss.png", "expert_load.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in files if name.startswith(".tmp")]

    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [2, 4, 6]
    for row in rows:
        assert METRIC_FIELDS <= set(row)
        for key in ("train_loss", "val_loss", "aux_loss", "z_loss", "tokens_per_second"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert len(row["tokens_per_expert"]) == 2 and all(len(layer) == 3 for layer in row["tokens_per_expert"])
        # dropless top-2: every token of every step in the window is counted twice per layer
        assert [sum(layer) for layer in row["tokens_per_expert"]] == [2 * BATCH * SEQ_LEN * 2] * 2
        assert row["dropped_fraction"] == [0.0, 0.0]

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["val_loss"] == summary["val_loss"]
    assert written["val_loss"] == rows[-1]["val_loss"]
    assert written["unigram_loss"] == pytest.approx(data.unigram_loss())
    assert written["steps"] == 6
    assert written["device"] == "cpu"
    assert written["seconds"] > 0


def test_val_loss_is_the_mean_cross_entropy_of_the_fixed_validation_batches(data, tmp_path):
    trainer = make_trainer(data, tmp_path, steps=2)
    trainer.run()
    trainer.model.eval()
    expected = np.mean([trainer.model.loss(x, y)[1]["cross_entropy"] for x, y in trainer.val_batches])
    assert read_metrics(tmp_path)[-1]["val_loss"] == pytest.approx(expected, rel=1e-6)
    for inputs, targets in trainer.val_batches:
        assert inputs.shape == (BATCH, SEQ_LEN)
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_capacity_drops_are_reported(data, tmp_path):
    trainer = make_trainer(data, tmp_path, model_overrides=dict(capacity_factor=0.5, moe_layers=[1]), steps=2)
    trainer.run()
    (row,) = read_metrics(tmp_path)
    assert len(row["tokens_per_expert"]) == 1  # only MoE layers are reported
    (dropped,) = row["dropped_fraction"]
    assert 0 < dropped < 1
    assignments_per_step = BATCH * SEQ_LEN * 2
    capacity = math.ceil(0.5 * BATCH * SEQ_LEN * 2 / 3)
    assert sum(row["tokens_per_expert"][0]) == pytest.approx(2 * assignments_per_step * (1 - dropped))
    assert max(row["tokens_per_expert"][0]) <= 2 * capacity


def test_training_lowers_the_validation_loss(data, tmp_path):
    make_trainer(data, tmp_path, steps=40, eval_every=20, lr=2e-2, warmup_steps=5).run()
    rows = read_metrics(tmp_path)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert rows[-1]["val_loss"] < math.log(len(data.vocab))


def test_same_seed_same_run_other_seed_other_run(data, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / name).mkdir()
        make_trainer(data, tmp_path / name, steps=2, seed=seed).run()
    a, b, c = (without_timing(read_metrics(tmp_path / name)) for name in "abc")
    assert a == b
    assert a != c


# ----- resume ------------------------------------------------------------------------------------------------
RESUME_CASES = {
    "dropout+jitter": dict(dropout=0.2, jitter=0.2),
    "noisy router": dict(router="noisy"),
    "sigmoid bias": dict(router="sigmoid", bias_update_rate=0.05, n_shared_experts=1),
}


@pytest.mark.parametrize("model_overrides", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(data, tmp_path, model_overrides):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    straight = make_trainer(data, straight_dir, model_overrides=model_overrides)
    straight.run()

    interrupted = make_trainer(data, resumed_dir, stream=InterruptAtEval(4), model_overrides=model_overrides)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert load_checkpoint(resumed_dir / "checkpoint.npz").meta["step"] == 4

    resumed = make_trainer(data, resumed_dir, model_overrides=model_overrides, seed=0)
    resumed.resume()
    assert resumed.step == 4
    resumed.run()

    assert without_timing(read_metrics(resumed_dir)) == without_timing(read_metrics(straight_dir))
    for (name, expected), (_, actual) in zip(straight.model.state_dict().items(),
                                             resumed.model.state_dict().items()):
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    expected_state, actual_state = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert actual_state["step_count"] == expected_state["step_count"] == 6
    for position, entry in expected_state["state"].items():
        for key, value in entry.items():
            np.testing.assert_array_equal(actual_state["state"][position][key], value)
    assert resumed.optimizer.lr == straight.optimizer.lr


def test_resume_drops_metrics_rows_written_after_the_checkpoint(data, tmp_path):
    make_trainer(data, tmp_path, steps=4).run()
    checkpoint_rows = read_metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**checkpoint_rows[-1], "step": 6}) + "\n")  # an eval whose checkpoint never landed
    trainer = make_trainer(data, tmp_path, steps=6)
    trainer.resume()
    assert [row["step"] for row in read_metrics(tmp_path)] == [2, 4]
    trainer.run()
    assert [row["step"] for row in read_metrics(tmp_path)] == [2, 4, 6]


def test_resume_without_a_checkpoint(data, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint.npz"):
        make_trainer(data, tmp_path).resume()


def test_resume_with_another_model_config(data, tmp_path):
    make_trainer(data, tmp_path, steps=2).run()
    with pytest.raises(CheckpointError, match="n_experts"):
        make_trainer(data, tmp_path, model_overrides=dict(n_experts=4)).resume()


def test_resume_reads_the_flat_model_config_of_earlier_releases(data, tmp_path):
    make_trainer(data, tmp_path, steps=2).run()
    path = os.path.join(tmp_path, "checkpoint.npz")
    checkpoint = load_checkpoint(path)
    nested = checkpoint.meta["model_config"]
    flat = {**{key: value for key, value in nested.items() if key != "moe"},
            **{key: value for key, value in nested["moe"].items() if key in FLAT_MOE_KEYS}}
    assert "n_experts" in flat and "moe" not in flat  # the 0.1 layout
    save_checkpoint(path, checkpoint.model_state, checkpoint.optimizer_state, {**checkpoint.meta, "model_config": flat})
    trainer = make_trainer(data, tmp_path, steps=4)
    trainer.resume()
    assert trainer.step == 2
    with pytest.raises(CheckpointError, match="n_experts"):
        make_trainer(data, tmp_path, model_overrides=dict(n_experts=4)).resume()


def test_resume_with_another_vocabulary(data, tmp_path):
    make_trainer(data, tmp_path, steps=2).run()
    shuffled = CharData(vocab=data.vocab[::-1], train=data.train, val=data.val)  # same size, other symbols
    with pytest.raises(ValueError, match="vocabulary"):
        make_trainer(shuffled, tmp_path).resume()


# ----- checks and failures -----------------------------------------------------------------------------------
def test_trainer_rejects_inconsistent_configs(data, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        make_trainer(data, tmp_path, model_overrides=dict(vocab_size=len(data.vocab) + 1))
    with pytest.raises(ValueError, match="max_seq_len"):
        make_trainer(data, tmp_path, model_overrides=dict(max_seq_len=SEQ_LEN - 1))


@pytest.mark.parametrize("overrides, error, message", [
    (dict(steps=0), ValueError, "steps=0 must be >= 1"), (dict(batch_size=0), ValueError, "batch_size=0 must be >= 1"),
    (dict(eval_every=0), ValueError, "eval_every=0 must be >= 1"), (dict(lr=0.0), ValueError, "lr=0.0 must be > 0"),
    (dict(min_lr=1.0, lr=0.1), ValueError, r"min_lr=1.0 must be in \[0.0, 0.1\]"),
    (dict(steps=2.5), TypeError, "steps=2.5 must be an int"), (dict(seed=None), TypeError, "seed=None must be an int"),
    (dict(lr=float("nan")), TypeError, "lr=nan must be a finite real number"),
    (dict(grad_accum=True), TypeError, "grad_accum=True must be an int"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps=-1 must be >= 0"),
    (dict(checkpoint_every=-1), ValueError, "checkpoint_every=-1 must be >= 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay=-0.1 must be >= 0"),
    (dict(checkpoint_seconds=float("inf")), TypeError, "checkpoint_seconds=inf must be a finite"),
    (dict(grad_clip=0.0), ValueError, "grad_clip=0.0 must be > 0")])
def test_train_config_rejects_bad_values(overrides, error, message):
    with pytest.raises(error, match="TrainConfig: " + message):
        TrainConfig(**overrides)


def test_train_config_keeps_python_numbers():
    config = TrainConfig(steps=np.int64(3), lr=np.float32(0.5), min_lr=0, checkpoint_every=None)
    assert (type(config.steps), config.steps, type(config.lr), config.lr) == (int, 3, float, 0.5)
    assert (type(config.min_lr), config.checkpoint_every) == (float, None)


def test_non_finite_loss_stops_training_with_a_clear_error(data, tmp_path, monkeypatch):
    trainer = make_trainer(data, tmp_path)
    real_loss = trainer.model.loss

    def nan_loss(tokens, targets):
        total, parts = real_loss(tokens, targets)
        return total * float("nan"), dict(parts, total=float("nan"))

    monkeypatch.setattr(trainer.model, "loss", nan_loss)
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.run()


# ----- progress ----------------------------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(120, stream, plain_every=50)
    for step in range(1, 121):
        progress.update(step, loss=2.5, aux=1.0, tokens_per_second=1000.0)
    progress.message("done")
    text = stream.getvalue()
    assert "\r" not in text and "\033" not in text
    lines = text.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["1/120", "50/120", "100/120", "120/120"]
    assert lines[-1] == "done"
    assert "loss 2.5000" in lines[0]


def test_progress_rewrites_one_line_on_a_terminal():
    stream = FakeTerminal()
    progress = Progress(10, stream)
    for step in range(1, 11):
        progress.update(step, loss=1.0, aux=1.0, tokens_per_second=10.0)
    text = stream.getvalue()
    assert text.count("\r") == 10
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, finished at the last step
    assert "10/10" in text.split("\r")[-1]


def test_trainer_progress_goes_to_its_stream(data, tmp_path):
    stream = io.StringIO()
    make_trainer(data, tmp_path, stream=stream, steps=4).run()
    text = stream.getvalue()
    assert "eval at step 2" in text and "eval at step 4" in text
    assert "step 4/4" in text
