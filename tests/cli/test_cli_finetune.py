"""`tinymoe train --from-pretrained DIR --data FILE`: fine-tuning a tiny Qwen3-MoE checkpoint on a repeated text
lowers the loss, and --out loads back with from_pretrained with the fine-tuned weights."""
import json

import numpy as np
import pytest

from cli_helpers import assert_ok, assert_one_line_error, read_metrics, tinymoe
from tinymoe.models import from_pretrained
from tinymoe.train.finetune import finetune
from tinymoe.train.train_config import TrainConfig

TEXT = "the cat sees a tree . the dog runs and the owl sees a river . " * 40
SMALL = ["--steps", "12", "--batch-size", "4", "--seq-len", "8", "--lr", "0.01", "--warmup", "0", "--eval-every",
         "6", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("finetune") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_fine_tuning_lowers_the_loss_and_writes_a_loadable_model(tokenizer_json, text_file, tmp_path):
    directory, _, _ = tokenizer_json
    out = tmp_path / "tuned"
    result = tinymoe("train", "--from-pretrained", directory, "--data", text_file, "--out", out, *SMALL, cwd=tmp_path)
    assert_ok(result)
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [6, 12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_loss"] < 0.7 * summary["first_train_loss"]
    assert rows[1]["val_loss"] < rows[0]["val_loss"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in out.iterdir()}
    ids = np.array([[1, 2, 4, 5, 6]])
    tuned, original = from_pretrained(out)(ids).numpy(), from_pretrained(directory)(ids).numpy()
    assert not np.allclose(tuned, original, atol=1e-3)
    generated = tinymoe("generate", "--model", out, "--prompt", "the cat", "--max-new-tokens", "4", cwd=tmp_path)
    assert_ok(generated)
    assert generated.stdout.startswith("the cat ")


def test_the_saved_model_gives_the_fine_tuned_logits(pretrained, tmp_path):
    directory, _, _ = pretrained
    model = from_pretrained(directory)
    tokens = np.tile([1, 2, 4, 5, 6, 12, 1, 3, 10, 12], 30)
    config = TrainConfig(steps=6, batch_size=4, seq_len=8, lr=0.01, warmup_steps=0, eval_every=3, eval_batches=1,
                         grad_accum=2)
    summary = finetune(model, tokens, config, tmp_path / "out")
    assert summary["train_loss"] < summary["first_train_loss"]
    ids = np.array([[1, 2, 4, 5, 6, 12]])
    np.testing.assert_array_equal(from_pretrained(tmp_path / "out")(ids).numpy(), model.eval()(ids).numpy())


FINETUNE_ERRORS = {
    "no data": (lambda d, t: [], "--data", 2),
    "model flags": (lambda d, t: ["--data", t, "--experts", "8"], "--experts", 2),
    "resume": (lambda d, t: ["--data", t, "--resume"], "--resume", 2),
    "text too short": (lambda d, t: ["--data", t, "--seq-len", "4000"], "too few", 2),
    "not a checkpoint": (lambda d, t: ["--data", t, "--from-pretrained", d.parent], "tokenizer.json", 2),
}


@pytest.mark.parametrize("make_args, fragment, code", FINETUNE_ERRORS.values(), ids=FINETUNE_ERRORS.keys())
def test_fine_tuning_user_errors_are_one_line(tokenizer_json, text_file, tmp_path, make_args, fragment, code):
    directory, _, _ = tokenizer_json
    args = ["train", "--from-pretrained", directory, "--out", tmp_path / "out", "--steps", "1",
            *make_args(directory, text_file)]
    result = tinymoe(*args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert result.returncode == code


# ----- an --out that holds a model or a run is never replaced without --overwrite (as `tinymoe train`) ----------
TAKEN = ["model.safetensors", "model.safetensors.index.json", "checkpoint.npz", "metrics.jsonl", "summary.json"]
TOKENS = np.tile([1, 2, 4, 5, 6, 12, 1, 3, 10, 12], 30)
TINY_CONFIG = dict(steps=2, batch_size=2, seq_len=8, lr=0.01, warmup_steps=0, eval_every=1, eval_batches=1)


def stale_run(out, names):
    """An --out left by an earlier command: each named file holds a marker (metrics.jsonl a row of step 999)."""
    out.mkdir(exist_ok=True)
    for name in names:
        (out / name).write_text('{"step": 999}\n' if name == "metrics.jsonl" else "stale", encoding="utf-8")


@pytest.mark.parametrize("name", TAKEN)
def test_finetune_refuses_an_out_dir_holding_a_run(pretrained, tmp_path, name):
    directory, _, _ = pretrained
    out = tmp_path / "out"
    stale_run(out, [name])
    with pytest.raises(FileExistsError, match=f"{out} already holds {name}.*overwrite=True"):
        finetune(from_pretrained(directory), TOKENS, TrainConfig(**TINY_CONFIG), out)
    assert sorted(path.name for path in out.iterdir()) == [name]  # nothing written, nothing removed
    assert (out / name).read_text(encoding="utf-8") in ("stale", '{"step": 999}\n')


def test_finetune_overwrite_replaces_the_earlier_run(pretrained, tmp_path):
    directory, _, _ = pretrained
    out = tmp_path / "out"
    stale_run(out, TAKEN)
    model = from_pretrained(directory)
    summary = finetune(model, TOKENS, TrainConfig(**TINY_CONFIG), out, overwrite=True)
    assert [row["step"] for row in read_metrics(out)] == [1, 2]  # a fresh log: the stale row is gone
    assert json.loads((out / "summary.json").read_text()) == summary
    assert not (out / "model.safetensors.index.json").exists()  # it would shadow the new model.safetensors
    assert not (out / "checkpoint.npz").exists()
    ids = np.array([[1, 2, 4, 5, 6, 12]])
    np.testing.assert_array_equal(from_pretrained(out)(ids).numpy(), model.eval()(ids).numpy())


def test_finetune_overwrite_must_be_a_bool(pretrained, tmp_path):
    directory, _, _ = pretrained
    with pytest.raises(TypeError, match="finetune: overwrite='yes' must be a bool"):
        finetune(from_pretrained(directory), TOKENS, TrainConfig(**TINY_CONFIG), tmp_path / "out", overwrite="yes")


@pytest.mark.parametrize("names", [["metrics.jsonl"], ["summary.json"], ["model.safetensors", "metrics.jsonl"]])
def test_cli_refuses_an_out_holding_a_run(pretrained, text_file, tmp_path, names):
    directory, _, _ = pretrained
    out = tmp_path / "out"
    stale_run(out, names)
    result = tinymoe("train", "--from-pretrained", directory, "--data", text_file, "--out", out, *SMALL, cwd=tmp_path)
    assert_one_line_error(result, f"--out {out} already holds a model or training run ({names[0]})",
                          "replace it with --overwrite")
    assert result.returncode == 2
    assert sorted(path.name for path in out.iterdir()) == sorted(names)
    assert (out / names[0]).read_text(encoding="utf-8") in ("stale", '{"step": 999}\n')


def test_cli_overwrite_replaces_an_interrupted_run(tokenizer_json, text_file, tmp_path):
    directory, _, _ = tokenizer_json
    out = tmp_path / "out"
    stale_run(out, ["metrics.jsonl", "summary.json"])
    small = dict(zip(SMALL[::2], SMALL[1::2]), **{"--steps": "2", "--eval-every": "1"})
    options = [item for pair in small.items() for item in pair]
    result = tinymoe("train", "--from-pretrained", directory, "--data", text_file, "--out", out, *options,
                     "--overwrite", cwd=tmp_path)
    assert_ok(result)
    assert [row["step"] for row in read_metrics(out)] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
