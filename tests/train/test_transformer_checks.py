"""MoETransformer's guards: generate()'s arguments (prompt, length, temperature, top_k) raise errors naming the
argument and value; non-finite values raise FloatingPointError naming the block (dense or MoE), the logits
or the loss part, unless finite checks are off."""
import re

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.models import MoETransformer
from transformer_helpers import VOCAB, numpy_kernels, random_tokens, tiny_config  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the planted NaN/inf warn in the kernels


@pytest.fixture(scope="module")
def model():
    return MoETransformer(tiny_config(moe_layers=[1]), seed=0)


BAD_GENERATE = [
    (dict(prompt=[]), ValueError, "prompt is empty"),
    (dict(prompt=np.zeros(0, dtype=np.int64)), ValueError, "prompt is empty"),
    (dict(prompt="abc"), TypeError, "prompt must be a sequence of token ids"),
    (dict(prompt=5), TypeError, "prompt must be a sequence of token ids"),
    (dict(prompt=np.zeros((1, 3), dtype=np.int64)), ValueError, "prompt must be 1-D"),
    (dict(prompt=[1, 2.0]), TypeError, "prompt[1]=2.0 must be an int"),
    (dict(prompt=[1, True]), TypeError, "prompt[1]=True must be an int"),
    (dict(prompt=[1, VOCAB]), ValueError, f"prompt[1]={VOCAB} is outside the vocabulary [0, {VOCAB})"),
    (dict(prompt=[-1]), ValueError, f"prompt[0]=-1 is outside the vocabulary [0, {VOCAB})"),
    (dict(length=-1), ValueError, "length=-1 must be >= 0"),
    (dict(length=2.5), TypeError, "length=2.5 must be an int"),
    (dict(length="3"), TypeError, "length='3' must be an int"),
    (dict(temperature=-1.0), ValueError, "temperature=-1.0 must be >= 0"),
    (dict(temperature=float("nan")), TypeError, "temperature=nan must be a finite"),
    (dict(temperature=float("inf")), TypeError, "temperature=inf must be a finite"),
    (dict(temperature="1"), TypeError, "temperature='1' must be a finite"),
    (dict(top_k=0), ValueError, "top_k=0 must be >= 1"),
    (dict(top_k=1.5), TypeError, "top_k=1.5 must be an int"),
]


@pytest.mark.parametrize("arguments, error, message", BAD_GENERATE, ids=[repr(a) for a, _, _ in BAD_GENERATE])
def test_generate_arguments_are_checked_naming_them(model, arguments, error, message):
    with pytest.raises(error, match=re.escape(message)):
        model.generate(**{"prompt": [1, 2], "length": 2, **arguments})


def test_generate_accepts_numpy_prompts_and_zero_length(model):
    assert model.generate(np.array([1, 2, 3]), length=0) == []
    assert len(model.generate(np.array([1, 2], dtype=np.int32), length=3, generator=0)) == 3
    assert model.training  # mode restored


def _poison(parameter, value=np.nan):
    data = parameter.data.copy()
    data.reshape(-1)[0] = value
    parameter.data = data


@pytest.mark.parametrize("block, kind", [(0, "SwiGLU"), (1, "MoE")])
def test_a_non_finite_block_is_named(block, kind):
    model = MoETransformer(tiny_config(moe_layers=[1]), seed=0)
    ffn = model.blocks[block].ffn
    _poison(ffn.experts.w2 if kind == "MoE" else ffn.w2)
    with pytest.raises(FloatingPointError, match=rf"{kind} 'blocks\.{block}\.ffn': (expert )?output is not finite"):
        model.loss(random_tokens((2, 5)), random_tokens((2, 5), seed=1))


def test_non_finite_logits_are_named():
    model = MoETransformer(tiny_config(moe_layers=[1]), seed=0)
    _poison(model.final_norm.weight, np.inf)
    with pytest.raises(FloatingPointError, match=r"MoETransformer: logits are not finite"):
        model(random_tokens((2, 5)))


def test_non_finite_loss_parts_are_named():
    model = MoETransformer(tiny_config(moe_layers=[1]), seed=0)
    tokens, targets = random_tokens((2, 5)), random_tokens((2, 5), seed=1)
    with tm.finite_checks(False):  # the layer checks off: only the loss's (free) check of its host values
        assert np.isfinite(model.loss(tokens, targets)[1]["total"])
    model.config.z_coef = float("inf")
    with pytest.raises(FloatingPointError, match=r"MoETransformer\.loss: total not finite"):
        model.loss(tokens, targets)


def test_checks_off_let_nan_through():
    model = MoETransformer(tiny_config(moe_layers=[1]), seed=0)
    _poison(model.blocks[1].ffn.experts.w2)
    with tm.finite_checks(False):
        total, parts = model.loss(random_tokens((2, 5)), random_tokens((2, 5), seed=1))
    assert np.isnan(parts["total"])
