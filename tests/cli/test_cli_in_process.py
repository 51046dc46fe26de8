"""Parts of the command line that are easier to reach in-process: `gradcheck` catching a wrong backward
(and exiting non-zero), and `train` without matplotlib."""
import json
import os
import sys

import numpy as np
import pytest

import tinymoe
from tinymoe import selfcheck
from tinymoe.cli import main
from tinymoe.engine.function import Function


class WrongSquare(Function):
    """y = x²  with a deliberately wrong backward (x·g instead of 2x·g)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return x * grad


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


def test_gradcheck_reports_a_wrong_backward_and_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setitem(selfcheck.CASES, "wrong square", selfcheck._op(lambda x: WrongSquare.apply(x), (3, 2)))
    only = {name: selfcheck.CASES[name] for name in ("linear", "wrong square", "rms_norm")}
    monkeypatch.setattr(selfcheck, "CASES", only)
    assert main(["gradcheck"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("2 passed, 1 failed")
    (row,) = [line for line in lines if line.startswith("wrong square")]
    assert "FAILED" in row
    assert all(" ok " in line for line in lines[1:-1] if not line.startswith("wrong square"))


def test_gradcheck_failure_shows_the_worst_mismatch_and_verbose_the_report(monkeypatch, capsys):
    from tinymoe.engine.gradcheck import GradcheckError, gradcheck

    build = selfcheck._op(lambda x: WrongSquare.apply(x), (3, 2))
    monkeypatch.setattr(selfcheck, "CASES", {"wrong square": build})
    with pytest.raises(GradcheckError) as failure:
        gradcheck(*build(np.random.default_rng(0), "cpu"))
    assert main(["gradcheck"]) == 1
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrong square")]
    assert row.endswith(failure.value.report.summary())
    assert main(["gradcheck", "--verbose"]) == 1
    verbose = capsys.readouterr().out
    assert "    gradcheck failed (eps=1e-06" in verbose and "comparison(s) failed" in verbose


def test_train_without_matplotlib_writes_no_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    text = "".join(f"{a} plus {b} is {a + b}\n" for a in range(15) for b in range(15))
    (tmp_path / "data.txt").write_text(text)
    out = tmp_path / "run"
    status = main(["train", "--data", str(tmp_path / "data.txt"), "--steps", "2", "--eval-every", "2", "--out",
                   str(out), "--d-model", "8", "--layers", "1", "--heads", "2", "--seq-len", "8", "--d-ff", "8",
                   "--batch-size", "2", "--eval-batches", "1"])
    assert status == 0
    files = {path.name for path in out.iterdir()}
    assert {"checkpoint.npz", "metrics.jsonl", "summary.json"} <= files
    assert not {name for name in files if name.endswith(".png")}
    assert json.loads((out / "summary.json").read_text())["plots"] == []
    assert "png" not in capsys.readouterr().out.split("wrote")[-1]


def test_plots_with_one_evaluation_and_with_dense_layers_only(tmp_path):
    pytest.importorskip("matplotlib")
    from tinymoe.train.plots import plot_run

    one_eval = [{"step": 5, "train_loss": 2.0, "val_loss": 2.1, "tokens_per_expert": [[3, 5, 8]]}]
    written = plot_run(one_eval, {"unigram_loss": 2.5}, tmp_path)
    assert sorted(os.path.basename(path) for path in written) == ["expert_load.png", "loss.png"]
    dense = [{"step": s, "train_loss": 2.0 / s, "val_loss": 2.0 / s, "tokens_per_expert": []} for s in (1, 2)]
    (tmp_path / "dense").mkdir()
    written = plot_run(dense, {"unigram_loss": 2.5}, tmp_path / "dense")
    assert [os.path.basename(path) for path in written] == ["loss.png"]
    assert plot_run([], {}, tmp_path / "dense") == []
    for path in written:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_loss_plot_keeps_the_unigram_baseline_inside_the_frame(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from tinymoe.train.plots import plot_run

    limits, real_set_ylim = [], Axes.set_ylim

    def spy(self, *args, **kwargs):
        limits.append(args)
        return real_set_ylim(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_ylim", spy)
    rows = [{"step": s, "train_loss": 3.0 / s, "val_loss": 3.1 / s, "tokens_per_expert": []} for s in (1, 2, 3)]
    plot_run(rows, {"unigram_loss": 3.2}, tmp_path)
    bottom, top = [args for args in limits if len(args) == 2][-1]  # the call plot_run makes (matplotlib makes others)
    assert bottom < 1.0 and top > 3.2 + 0.1  # room above the baseline for its label
    assert matplotlib.get_backend().lower() == "agg"
