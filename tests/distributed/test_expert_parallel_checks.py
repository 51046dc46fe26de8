"""ExpertParallelMoE checks its input and output as MoE does: the same bad input gives the same exception type
and the same message from both layers (one rank, LocalCommunicator), and a non-finite output raises the same
FloatingPointError under the same switch (`tinymoe.set_finite_checks`, `tinymoe.finite_checks`).

The expected type and the words each message must hold come from the table, not from either layer."""
import re

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.distributed import LocalCommunicator
from tinymoe.engine.tensor import Tensor
from tinymoe.nn.expert_parallel import ExpertParallelMoE

# The kernels warn about the NaN and inf these tests plant; the layers' FloatingPointError is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAME = "blocks.0.ffn"  # a named layer: messages start "MoE 'blocks.0.ffn': " (MoE.label)
D_MODEL = 6


class ElsewhereTensor(Tensor):
    """A float64 CPU tensor that says it lives on another device: the device check without a second device."""

    __slots__ = ()

    @property
    def device(self):
        return "cuda"


def both_layers(**options):
    config = dict(d_model=D_MODEL, d_ff=5, n_experts=4, top_k=2, dtype="float64", **options)
    return (tm.nn.MoE(**config, generator=0, name=NAME),
            ExpertParallelMoE(**config, comm=LocalCommunicator(), generator=0, name=NAME))


def raised_by(layer, x):
    try:
        layer(x)
    except Exception as error:  # noqa: BLE001 - which exception is exactly what is compared
        return error
    raise AssertionError(f"{type(layer).__name__} accepted the bad input")


def rows(*shape, dtype="float64", value=0.5):
    return np.full(shape, value, dtype=dtype)


BAD_INPUTS = [  # (id, x, expected type, words the message must hold)
    ("numpy array", lambda: rows(3, D_MODEL), TypeError, ["x", "Tensor"]),
    ("list", lambda: [[0.5] * D_MODEL], TypeError, ["x", "Tensor"]),
    ("zero-dimensional", lambda: tm.tensor(0.5, dtype="float64"), ValueError, ["d_model=6", "shape ()"]),
    ("last dimension 5", lambda: tm.tensor(rows(3, 5)), ValueError, ["d_model=6", "(3, 5)"]),
    ("last dimension 7, 3-d", lambda: tm.tensor(rows(2, 3, 7)), ValueError, ["d_model=6", "(2, 3, 7)"]),
    ("float32 into float64", lambda: tm.tensor(rows(3, D_MODEL), dtype="float32"), TypeError,
     ["float32", "float64"]),
    ("integer tensor", lambda: Tensor(np.ones((3, D_MODEL), dtype=np.int64)), TypeError, ["floating Tensor", "int64"]),
    ("other device", lambda: ElsewhereTensor(rows(3, D_MODEL)), ValueError, ["'cuda'", "'cpu'"]),
    ("no tokens", lambda: tm.tensor(rows(0, D_MODEL)), ValueError, ["no tokens", "(0, 6)"]),
    ("no tokens, 3-d", lambda: tm.tensor(rows(2, 0, D_MODEL)), ValueError, ["no tokens", "(2, 0, 6)"]),
    ("NaN input", lambda: tm.tensor(rows(3, D_MODEL, value=np.nan)), FloatingPointError,
     ["router logits are not finite"]),
    ("inf input", lambda: tm.tensor(rows(3, D_MODEL, value=np.inf)), FloatingPointError,
     ["router logits are not finite"]),
]


@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("make_x, expected, words", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_the_same_bad_input_raises_the_same_error_from_both_layers(router, make_x, expected, words):
    single, parallel = both_layers(router=router)
    single_error, parallel_error = raised_by(single, make_x()), raised_by(parallel, make_x())
    assert type(single_error) is expected and type(parallel_error) is expected
    assert str(parallel_error) == str(single_error)
    message = str(parallel_error)
    assert message.startswith(f"MoE '{NAME}': "), message
    for word in words:
        assert word in message, (word, message)


def plant(layer, bad):
    """A bad value in every expert's w2 (all E experts, or the rank's E/P): whichever is chosen, it shows."""
    layer.experts.w2.data[:, 0, 0] = bad


@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shared", [0, 1])
def test_a_non_finite_expert_output_raises_the_same_error_from_both_layers(router, bad, shared):
    single, parallel = both_layers(router=router, n_shared_experts=shared)
    plant(single, bad), plant(parallel, bad)
    x = np.random.default_rng(0).standard_normal((2, 4, D_MODEL))
    single_error, parallel_error = raised_by(single, tm.tensor(x)), raised_by(parallel, tm.tensor(x))
    assert type(single_error) is FloatingPointError and type(parallel_error) is FloatingPointError
    assert str(parallel_error) == str(single_error)
    assert re.match(rf"MoE '{re.escape(NAME)}': expert output is not finite \(NaN or inf\); .*"
                    r"tinymoe\.set_finite_checks\(False\)", str(parallel_error))


def test_the_finite_check_follows_the_same_switch():
    single, parallel = both_layers()
    plant(single, np.nan), plant(parallel, np.nan)
    x = np.random.default_rng(1).standard_normal((5, D_MODEL))
    with tm.finite_checks(False):  # off: the NaN passes through both, at the same places
        out_single, out_parallel = single(tm.tensor(x)).numpy(), parallel(tm.tensor(x)).numpy()
    assert np.isnan(out_parallel).any()
    np.testing.assert_array_equal(np.isnan(out_parallel), np.isnan(out_single))
    tm.set_finite_checks(False)
    try:
        assert np.isnan(parallel(tm.tensor(x)).numpy()).any()
    finally:
        tm.set_finite_checks(True)
    with pytest.raises(FloatingPointError, match="expert output is not finite"):  # on again
        parallel(tm.tensor(x))


def test_a_finite_output_passes_the_check_unchanged():
    single, parallel = both_layers()
    x = tm.tensor(np.random.default_rng(2).standard_normal((5, D_MODEL)))
    with tm.finite_checks(False):
        unchecked = parallel(x).numpy()
    np.testing.assert_array_equal(parallel(x).numpy(), unchecked)
    np.testing.assert_array_equal(parallel(x).numpy(), single(x).numpy())
