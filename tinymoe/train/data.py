"""Character-level data: a vocabulary, train/validation token arrays, random batches, the unigram baseline."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """The training text cannot be used (missing, empty, binary, too short)."""


def read_text(path) -> str:
    """A UTF-8 text file's contents, with a DataError that says what is wrong otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file")
    with open(path, "rb") as handle:
        raw = handle.read()
    if not raw.strip():
        raise DataError(f"--data {path}: the file is empty")
    if b"\x00" in raw:
        raise DataError(f"--data {path}: looks like a binary file (it contains NUL bytes); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"--data {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


@dataclass
class CharData:
    """vocab: the sorted characters; train, val: int64 token arrays (the last `val_fraction` is validation)."""

    vocab: str
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def from_text(cls, text: str, seq_len: int, val_fraction: float = 0.1) -> "CharData":
        if not text:
            raise DataError("the training text is empty")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} must be strictly between 0 and 1")
        vocab = "".join(sorted(set(text)))
        lookup = {character: index for index, character in enumerate(vocab)}
        tokens = np.fromiter((lookup[c] for c in text), dtype=np.int64, count=len(text))
        split = int(len(tokens) * (1 - val_fraction))
        train, val = tokens[:split], tokens[split:]
        if len(train) <= seq_len or len(val) <= seq_len:
            raise DataError(f"the text has {len(text)} characters: too short for sequences of {seq_len} "
                            f"(need more than {math.ceil((seq_len + 1) / val_fraction)})")
        return cls(vocab, train, val)

    def encode(self, text: str) -> list:
        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise DataError(f"characters {unknown!r} are not in the model's vocabulary")
        return [self.vocab.index(c) for c in text]

    def decode(self, tokens) -> str:
        return "".join(self.vocab[int(t)] for t in tokens)

    def batch(self, generator: np.random.Generator, split: str, batch_size: int, seq_len: int):
        """(inputs, targets), each (batch_size, seq_len) int64: random windows and the same shifted by one."""
        tokens = self.train if split == "train" else self.val
        starts = generator.integers(0, len(tokens) - seq_len, size=batch_size)
        windows = tokens[starts[:, None] + np.arange(seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    def unigram_loss(self) -> float:
        """Cross-entropy (nats) of the validation text under the training characters' frequencies (add-one)."""
        counts = np.bincount(self.train, minlength=len(self.vocab)).astype(np.float64) + 1.0
        log_probability = np.log(counts / counts.sum())
        return float(-log_probability[self.val].mean())
