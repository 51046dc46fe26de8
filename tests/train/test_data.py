"""Character data: reading the text file, the vocabulary and split, batches, the unigram baseline, the corpus."""
import math
from collections import Counter

import numpy as np
import pytest

from tinymoe.train.corpus import generate_corpus
from tinymoe.train.data import CharData, DataError, read_text


# ----- read_text ---------------------------------------------------------------------------------------------
def test_read_text_returns_the_utf8_contents(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes("naïve café — ok\n".encode("utf-8"))
    assert read_text(path) == "naïve café — ok\n"


def test_read_text_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="no-such.txt"):
        read_text(tmp_path / "no-such.txt")


def test_read_text_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError):
        read_text(tmp_path)


@pytest.mark.parametrize("content", [b"", b"   \n\t\n"], ids=["empty", "whitespace"])
def test_read_text_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty"):
        read_text(path)


def test_read_text_binary_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.arange(64, dtype=np.int32).tobytes())
    with pytest.raises(DataError, match="binary"):
        read_text(path)


def test_read_text_utf16_is_reported_as_not_plain_text(tmp_path):
    path = tmp_path / "utf16.txt"
    path.write_bytes("hello world".encode("utf-16"))
    with pytest.raises(DataError):
        read_text(path)


def test_read_text_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème brûlée".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_text(path)


# ----- CharData ----------------------------------------------------------------------------------------------
TEXT = "abracadabra, banana bandana! " * 12  # 348 characters


def test_vocabulary_is_the_sorted_characters_and_tokens_round_trip():
    data = CharData.from_text(TEXT, seq_len=8)
    assert data.vocab == "".join(sorted(set(TEXT)))
    assert data.decode(np.concatenate([data.train, data.val])) == TEXT
    assert data.encode("banana") == [data.vocab.index(c) for c in "banana"]
    assert data.decode(data.encode("bad cab")) == "bad cab"
    assert data.train.dtype == np.int64 and data.val.dtype == np.int64


def test_validation_is_the_tail_of_the_text():
    data = CharData.from_text(TEXT, seq_len=8, val_fraction=0.25)
    n_val = len(TEXT) - int(len(TEXT) * 0.75)
    assert len(data.val) == n_val
    assert data.decode(data.val) == TEXT[-n_val:]
    assert data.decode(data.train) == TEXT[:-n_val]


def test_encode_rejects_unknown_characters():
    data = CharData.from_text(TEXT, seq_len=8)
    with pytest.raises(DataError, match="z"):
        data.encode("zebra")


@pytest.mark.parametrize("text", ["", "abc", "abcdefgh" * 3])
def test_too_short_text_is_a_data_error(text):
    with pytest.raises(DataError):
        CharData.from_text(text, seq_len=16)


def test_just_long_enough_text_works():
    seq_len = 4
    text = "".join(chr(ord("a") + i % 7) for i in range(200))
    data = CharData.from_text(text, seq_len=seq_len)
    assert len(data.val) > seq_len and len(data.train) > seq_len


def test_unigram_loss_by_hand():
    # 20 training characters, 10 validation characters (val_fraction 1/3)
    train_text, val_text = "aaaaaaaaaabbbbbbcccd", "abcdaaaeee"
    data = CharData.from_text(train_text + val_text, seq_len=3, val_fraction=1 / 3)
    assert data.decode(data.val) == val_text
    counts = Counter(train_text)
    vocabulary = sorted(set(train_text + val_text))  # 'e' only occurs in validation: add-one gives it mass
    total = sum(counts[c] + 1 for c in vocabulary)
    expected = -sum(math.log((counts[c] + 1) / total) for c in val_text) / len(val_text)
    assert data.unigram_loss() == pytest.approx(expected, rel=1e-12)


def test_unigram_loss_of_a_uniform_text_is_log_vocab():
    text = "abcd" * 100
    data = CharData.from_text(text, seq_len=4)
    assert data.unigram_loss() == pytest.approx(math.log(4), rel=1e-3)


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_are_windows_and_targets_are_shifted_by_one(split):
    data = CharData.from_text(TEXT, seq_len=8, val_fraction=0.3)
    source = data.train if split == "train" else data.val
    text = data.decode(source)
    inputs, targets = data.batch(np.random.default_rng(0), split, batch_size=16, seq_len=8)
    assert inputs.shape == targets.shape == (16, 8)
    assert inputs.dtype.kind == "i" and targets.dtype.kind == "i"
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    for row_in, row_target in zip(inputs, targets):
        window = data.decode(row_in) + data.decode(row_target[-1:])
        assert window in text  # a contiguous window of this split, 9 characters long


def test_batches_reach_both_ends_of_the_split():
    tokens = np.arange(12, dtype=np.int64)  # distinct ids make positions visible
    data = CharData(vocab="".join(chr(97 + i) for i in range(12)), train=tokens, val=tokens)
    generator = np.random.default_rng(1)
    firsts, lasts = set(), set()
    for _ in range(200):
        inputs, targets = data.batch(generator, "train", batch_size=4, seq_len=5)
        firsts.update(inputs[:, 0].tolist())
        lasts.update(targets[:, -1].tolist())
        assert targets.max() <= 11
    assert 0 in firsts  # the first token starts some window
    assert 11 in lasts  # the last token is some window's final target
    assert firsts == set(range(12 - 5))  # every valid start, no other


def test_batches_are_reproducible_from_the_generator_state():
    data = CharData.from_text(TEXT, seq_len=8)
    first = data.batch(np.random.default_rng(7), "train", 4, 8)
    second = data.batch(np.random.default_rng(7), "train", 4, 8)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


# ----- the default corpus ------------------------------------------------------------------------------------
def test_corpus_is_deterministic_sized_and_mixed():
    text = generate_corpus(5000, seed=3)
    assert text == generate_corpus(5000, seed=3)
    assert text != generate_corpus(5000, seed=4)
    assert len(text) >= 5000
    lines = text.splitlines()
    assert any(" + " in line or " - " in line for line in lines)  # arithmetic
    assert any("name=" in line for line in lines)  # records
    assert any(line.endswith(".") for line in lines)  # sentences
    for line in lines:
        if " = " in line and ("+" in line or " - " in line):
            left, result = line.split(" = ")
            a, op, b = left.split()
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, 1.5, -0.1])
def test_val_fraction_outside_zero_one_is_rejected_by_name(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        CharData.from_text("abcdefgh" * 100, seq_len=8, val_fraction=val_fraction)
