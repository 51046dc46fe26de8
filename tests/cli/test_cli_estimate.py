"""`tinymoe estimate`: the same model options as `tinymoe train` (one parser group), the numbers of
tinymoe.train.estimate for the config those options describe, a checkpoint's model, and one-line errors."""
import json
import shutil

import pytest

from cli_helpers import TEXT, assert_ok, assert_one_line_error, tinymoe
from tinymoe.cli.main import build_parser
from tinymoe.models import TransformerConfig
from tinymoe.train.estimate import estimate


def _json(result):
    assert_ok(result)
    return json.loads(result.stdout)


def _flags(parser_name):
    parser = build_parser()
    command = parser._subparsers._group_actions[0].choices[parser_name]
    return {action.option_strings[0] for action in command._actions if action.option_strings}


def test_estimate_takes_every_model_and_moe_option_of_train():
    model_flags = _flags("train") - {"--data", "--steps", "--device", "--matmul-precision", "--out", "--seed",
                                     "--resume", "--overwrite", "--checkpoint-every", "--kernels", "--lr", "--min-lr",
                                     "--warmup", "--weight-decay", "--grad-clip", "--eval-every", "--eval-batches",
                                     "--grad-accum", "--from-pretrained"}
    assert model_flags <= _flags("estimate")
    assert {"--experts", "--top-k", "--router", "--d-ff", "--shared-experts", "--seq-len"} <= model_flags


def test_defaults_are_the_default_training_run(tmp_path):
    numbers = _json(tinymoe("estimate", "--json", cwd=tmp_path))
    expected = estimate(TransformerConfig(vocab_size=41, moe={"d_ff": 128, "n_experts": 4}), 16, 64, 1)
    assert numbers == expected.to_dict()
    assert numbers["total_parameters"] == 236_928  # the count `tinymoe train` prints (README)


def test_model_and_step_options_reach_the_estimate(tmp_path):
    numbers = _json(tinymoe("estimate", "--json", "--experts", "8", "--top-k", "1", "--d-model", "32",
                            "--heads", "2", "--seq-len", "16", "--batch-size", "2", "--expert-parallel", "2",
                            "--shared-experts", "1", "--vocab-size", "100", cwd=tmp_path))
    config = TransformerConfig(vocab_size=100, d_model=32, n_heads=2, max_seq_len=16,
                               moe={"d_ff": 128, "n_experts": 8, "top_k": 1, "n_shared_experts": 1})
    assert numbers == estimate(config, 2, 16, 2).to_dict()


def test_a_checkpoint_gives_its_model_and_its_run_step(trained, tmp_path):
    out, _ = trained
    numbers = _json(tinymoe("estimate", "--json", "--checkpoint", out, cwd=tmp_path))
    config = TransformerConfig(vocab_size=len(set(TEXT)), d_model=16,
                               n_layers=1, n_heads=2, max_seq_len=16, moe={"d_ff": 16, "n_experts": 4})
    assert numbers == estimate(config, 4, 16, 1).to_dict()  # TINY: batch 4 x 16
    text = tinymoe("estimate", "--checkpoint", out / "checkpoint.npz", "--batch-size", "1", "--seq-len", "8",
                   cwd=tmp_path)
    assert_ok(text)
    assert "memory for batch 1 x 8" in text.stdout


ESTIMATE_ERRORS = {
    "ranks do not divide experts": (["--expert-parallel", "3"], "expert_parallel", 2),
    "top-k above experts": (["--top-k", "9"], "top_k", 2),
    "missing checkpoint": (["--checkpoint", "nowhere.npz"], "nowhere.npz", 2),
    "checkpoint and model flags": (["--checkpoint", "run", "--experts", "8"], "--experts", 2),
    "damaged checkpoint": (["--checkpoint", "broken.npz"], "broken.npz", 1),
    "batch 0": (["--batch-size", "0"], "argument --batch-size", 2),
}


@pytest.mark.parametrize("args, fragment, code", ESTIMATE_ERRORS.values(), ids=ESTIMATE_ERRORS.keys())
def test_estimate_user_errors_are_one_line(trained, tmp_path, args, fragment, code):
    shutil.copytree(trained[0], tmp_path / "run")
    (tmp_path / "broken.npz").write_bytes(b"PK not really")
    result = tinymoe("estimate", *args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert result.returncode == code
