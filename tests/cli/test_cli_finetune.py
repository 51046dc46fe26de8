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
