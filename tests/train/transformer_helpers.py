"""Tiny MoETransformer configs for the tests: model options and MoE options (given flat, as keywords, and
placed in the config's `moe`), NumPy kernels, random tokens."""
import numpy as np
import pytest

import tinymoe
from tinymoe.models import TransformerConfig
from tinymoe.nn.moe_config import option_names

VOCAB = 11
MOE_OPTIONS = set(option_names()) - {"d_model", "dtype"}


@pytest.fixture(autouse=True)
def numpy_kernels():
    with tinymoe.kernels.use("numpy"):
        yield


def split_options(values: dict) -> dict:
    """TransformerConfig keywords, with the MoE options among `values` moved into moe={...}."""
    values = dict(values)
    moe = {key: values.pop(key) for key in list(values) if key in MOE_OPTIONS}
    return {**values, "moe": moe}


def tiny_config(**overrides):
    values = dict(vocab_size=VOCAB, d_model=8, n_layers=2, n_heads=2, max_seq_len=8, d_ff=6, n_experts=4, top_k=2,
                  dtype="float64")
    values.update(overrides)
    return TransformerConfig(**split_options(values))


def random_tokens(shape, seed=0, vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)
