"""experts_per_token in metrics.jsonl, the progress line and experts_per_token.png: a top-p run's rows equal a
recount, in plain loops, of the experts each token of each training step used; plain top-k shows nothing new."""
import io
import json
import os

import numpy as np
import pytest

import tinymoe
from tinymoe.models import TransformerConfig
from tinymoe.train.data import CharData
from tinymoe.train.loop import TrainConfig, Trainer
from tinymoe.train.plots import plot_run
from tinymoe.train.window_stats import add_layer_counts, empty_window, window_from_meta, window_meta
from transformer_helpers import split_options

TEXT = "".join(f"{a} + {b} = {a + b}\n" for a in range(20) for b in range(0, 20, 3))
SEQ_LEN, BATCH, TOP_K = 8, 3, 3


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


def make_trainer(out_dir, stream, **moe):
    data = CharData.from_text(TEXT, seq_len=SEQ_LEN)
    model = dict(vocab_size=len(data.vocab), d_model=8, n_layers=2, n_heads=2, max_seq_len=SEQ_LEN, d_ff=8,
                 n_experts=4, top_k=TOP_K, **moe)
    train = TrainConfig(steps=4, batch_size=BATCH, seq_len=SEQ_LEN, eval_every=2, eval_batches=1, warmup_steps=1,
                        lr=1e-2, min_lr=1e-3)
    return Trainer(TransformerConfig(**split_options(model)), train, data, str(out_dir), stream=stream)


def record_training_decisions(trainer):
    """Per MoE layer, the (expert_ids, kept) of every training-mode forward, in order."""
    seen = [[] for _ in trainer.model.moe_layers()]
    for index, layer in enumerate(trainer.model.moe_layers()):
        def forward(x, layer=layer, index=index, original=layer.forward):
            out = original(x)
            if layer.training:
                seen[index].append(tuple(np.array(a) for a in layer.last_decisions))
            return out
        layer.forward = forward
    return seen


def test_top_p_rows_carry_experts_per_token_equal_to_a_recount(tmp_path):
    stream = io.StringIO()
    trainer = make_trainer(tmp_path, stream, router="top_p", top_p=0.4)
    seen = record_training_decisions(trainer)
    summary = trainer.run()
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert [row["step"] for row in rows] == [2, 4]
    for window, row in enumerate(rows):
        for layer, decisions in enumerate(seen):
            histogram = [0] * (TOP_K + 1)
            for _, kept in decisions[2 * window:2 * window + 2]:     # dropless: kept = the slots a token uses
                for token_slots in kept:
                    histogram[int(sum(bool(v) for v in token_slots))] += 1
            tokens = sum(histogram)
            assert tokens == 2 * BATCH * SEQ_LEN
            assert row["experts_per_token_histogram"][layer] == histogram
            mean = sum(n * h for n, h in enumerate(histogram)) / tokens
            assert row["experts_per_token"][layer] == pytest.approx(mean, abs=1e-12)
            assert 1 <= mean < TOP_K and histogram[TOP_K] < tokens        # it really varies
    assert "experts/token |" in stream.getvalue()
    assert "experts_per_token.png" in summary["plots"]
    assert (tmp_path / "experts_per_token.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_top_k_rows_hold_k_and_show_no_experts_per_token(tmp_path, monkeypatch):
    monkeypatch.setattr("tinymoe.train.loop.plot_run", lambda metrics, summary, out_dir: [])
    stream = io.StringIO()
    trainer = make_trainer(tmp_path, stream)
    trainer.run()
    for row in trainer.metrics:
        assert row["experts_per_token"] == [float(TOP_K)] * 2
        assert row["experts_per_token_histogram"] == [[0] * TOP_K + [2 * BATCH * SEQ_LEN]] * 2
    assert "experts/token" not in stream.getvalue()
    assert plot_run(trainer.metrics, {}, tmp_path) and not (tmp_path / "experts_per_token.png").exists()


def test_an_open_window_survives_the_checkpoint_metadata(tmp_path):
    trainer = make_trainer(tmp_path, io.StringIO(), router="top_p", top_p=0.4)
    window = empty_window(trainer.model)
    add_layer_counts(window, [(np.array([1, 2, 0, 3]), 0.0, np.array([0, 2, 1, 0])),
                              (np.array([0, 0, 4, 2]), 0.25, np.array([1, 1, 1, 0]))])
    add_layer_counts(window, [(np.array([1, 0, 0, 0]), 0.0, np.array([0, 1, 0, 0])),
                              (np.array([0, 1, 0, 0]), 0.5, np.array([0, 0, 0, 1]))])
    restored = window_from_meta(json.loads(json.dumps(window_meta(window))), trainer.model, "x")
    assert restored["experts"] == [[0, 3, 1, 0], [1, 1, 1, 1]] == window["experts"]
    assert [c.tolist() for c in restored["counts"]] == [[2, 2, 0, 3], [0, 1, 4, 2]]
    old = {key: value for key, value in window_meta(window).items() if key != "experts"}  # an earlier release
    assert window_from_meta(old, trainer.model, "x")["experts"] == [[], []]
