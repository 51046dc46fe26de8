"""Fixtures of the command-line tests: a work directory with a small text, and one tiny training run shared by
every test that reads its outputs."""
import pytest

from cli_helpers import TEXT, TINY, assert_ok, tinymoe


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    (directory / "data.txt").write_text(TEXT, encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def trained(workdir):
    """One tiny `tinymoe train` run shared by the tests that read its outputs (4 steps, evals at 2 and 4)."""
    result = tinymoe("train", "--data", "data.txt", "--steps", "4", "--out", "run", *TINY, cwd=workdir)
    assert_ok(result)
    return workdir / "run", result


# ----- a tiny transformers-format checkpoint with a word-level tokenizer (generate, fine-tuning) ----------------
WORDS = ["[UNK]", "the", "cat", "dog", "sees", "a", "tree", "stone", "river", "and", "runs", "owl", "."]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """(directory, config, tensors): a random 3-layer Qwen3-MoE checkpoint (every layer MoE, 4 experts, top-2) of
    vocabulary WORDS, written by the tests' NumPy writer, with tokenizer.json when `tokenizers` is installed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from hf_model_helpers import CONFIGS, write_checkpoint

    directory = tmp_path_factory.mktemp("pretrained")
    config = dict(CONFIGS["qwen3_moe"], vocab_size=len(WORDS), decoder_sparse_step=1)
    tensors = write_checkpoint(directory, config, seed=3)
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        return directory, config, tensors
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, config, tensors


@pytest.fixture
def tokenizer_json(pretrained):
    """The fixture checkpoint, skipped when the tokenizers package (tinymoe[hf]) is absent."""
    pytest.importorskip("tokenizers", reason="needs the tokenizers package: pip install 'tinymoe[hf]'")
    return pretrained
