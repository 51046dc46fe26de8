"""`tinymoe generate`: greedy tokens equal the library's generate, --prompt goes through tokenizer.json,
--show-routing names the experts a plain-loop NumPy decoder picks, and mistakes are one line on stderr."""
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_ok, assert_one_line_error, tinymoe
from tinymoe.cli import main
from tinymoe.models import from_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_model_helpers import _attention, _feed_forward, _rms  # noqa: E402


def reference_routing(config, tensors, ids):
    """Per position of ids (L,), per layer: the sorted top-k expert ids, by plain loops (softmax router)."""
    t = {key: np.asarray(value, dtype=np.float64) for key, value in tensors.items()}
    eps, h = config["rms_norm_eps"], t["model.embed_tokens.weight"][np.asarray(ids)]
    chosen = [[] for _ in ids]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        h = h + _attention(config, t, prefix + "self_attn.", _rms(h, t[prefix + "input_layernorm.weight"], eps))
        x = _rms(h, t[prefix + "post_attention_layernorm.weight"], eps)
        for position in range(len(ids)):
            logits = t[prefix + "mlp.gate.weight"] @ x[position]
            chosen[position].append(sorted(np.argsort(-logits, kind="stable")[:config["num_experts_per_tok"]].tolist()))
        h = h + _feed_forward(config, t, layer, x)
    return chosen


def run(capsys, *args):
    status = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_greedy_ids_equal_the_library_generate(pretrained, capsys):
    directory, _, _ = pretrained
    status, out, err = run(capsys, "--model", directory, "--prompt-ids", "1,2,4", "--max-new-tokens", "6")
    assert status == 0
    expected = from_pretrained(directory).generate(np.array([[1, 2, 4]]), max_new_tokens=6)[0]
    assert out.strip() == ",".join(map(str, expected))
    assert "prefill 3 tokens" in err and "decode 6 tokens" in err and "tok/s" in err


def test_sampling_is_seeded_and_equals_the_library(pretrained, capsys):
    directory, _, _ = pretrained
    flags = ["--model", directory, "--prompt-ids", "3", "--max-new-tokens", "8", "--temperature", "1.5",
             "--top-k", "6", "--top-p", "0.9", "--seed", "7"]
    first, second = run(capsys, *flags)[1], run(capsys, *flags)[1]
    assert first == second
    expected = from_pretrained(directory).generate(np.array([[3]]), max_new_tokens=8, temperature=1.5, top_k=6,
                                                   top_p=0.9, seed=7)[0]
    assert first.strip() == ",".join(map(str, expected))


def test_prompt_text_is_tokenized_and_decoded(tokenizer_json, capsys):
    from tokenizers import Tokenizer

    directory, _, _ = tokenizer_json
    status, out, _ = run(capsys, "--model", directory, "--prompt", "the cat sees", "--max-new-tokens", "5")
    assert status == 0
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prompt = tokenizer.encode("the cat sees").ids
    assert prompt == [1, 2, 4]
    expected = from_pretrained(directory).generate(np.array([prompt]), max_new_tokens=5)[0].tolist()
    assert out.strip() == tokenizer.decode(expected)
    assert out.startswith("the cat sees ")


def test_show_routing_names_the_experts_of_each_generated_token(pretrained, capsys):
    directory, config, tensors = pretrained
    status, out, _ = run(capsys, "--model", directory, "--prompt-ids", "1,2", "--max-new-tokens", "4",
                         "--show-routing")
    assert status == 0
    lines = out.strip().splitlines()
    ids = [int(token) for token in lines[0].split(",")]
    expected = reference_routing(config, tensors, ids)
    assert len(lines) == 1 + 4
    for position, line in enumerate(lines[1:]):
        token = ids[2 + position]
        layers = "; ".join(f"layer {layer} experts {experts}" for layer, experts in enumerate(expected[2 + position]))
        assert line == f"token {position} {token}: {layers}"


GENERATE_ERRORS = {
    "missing model dir": (lambda d: ["--model", d / "nowhere", "--prompt-ids", "1"], "nowhere", 1),
    "not a checkpoint": (lambda d: ["--model", d.parent, "--prompt-ids", "1"], "config.json", 1),
    "id outside vocab": (lambda d: ["--model", d, "--prompt-ids", "1,99"], "99", 2),
    "bad ids": (lambda d: ["--model", d, "--prompt-ids", "1,x"], "--prompt-ids", 2),
    "top-k when greedy": (lambda d: ["--model", d, "--prompt-ids", "1", "--top-k", "3"], "--temperature", 2),
    "top-k above vocab": (lambda d: ["--model", d, "--prompt-ids", "1", "--temperature", "1", "--top-k", "99"],
                          "--top-k", 2),
    "top-p 0": (lambda d: ["--model", d, "--prompt-ids", "1", "--top-p", "0"], "--top-p", 2),
    "no prompt": (lambda d: ["--model", d], "--prompt", 2),
    "prompt and ids": (lambda d: ["--model", d, "--prompt", "a", "--prompt-ids", "1"], "--prompt-ids", 2),
}


@pytest.mark.parametrize("make_args, fragment, code", GENERATE_ERRORS.values(), ids=GENERATE_ERRORS.keys())
def test_generate_user_errors_are_one_line(pretrained, make_args, fragment, code):
    directory, _, _ = pretrained
    result = tinymoe("generate", *make_args(directory), cwd=directory)
    assert_one_line_error(result, fragment)
    assert result.returncode == code


def test_a_prompt_without_tokenizers_names_the_extra(pretrained, tmp_path):
    directory, _, _ = pretrained
    (tmp_path / "tokenizers.py").write_text("raise ImportError('tokenizers is not installed here')\n")
    result = tinymoe("generate", "--model", directory, "--prompt", "the cat", cwd=tmp_path,
                     PYTHONPATH=str(tmp_path))
    if not (directory / "tokenizer.json").exists():
        assert_one_line_error(result, "tokenizer.json")
        return
    assert_one_line_error(result, "pip install 'tinymoe[hf]'")
    assert result.returncode == 1
    assert_ok(tinymoe("generate", "--model", directory, "--prompt-ids", "1", "--max-new-tokens", "2", cwd=tmp_path,
                      PYTHONPATH=str(tmp_path)))  # ids need NumPy alone
