"""Clear errors for bad MoE arguments and inputs, each naming the argument: options (checked by MoEConfig),
input shape, dtype and type."""
import numpy as np
import pytest

from moe_helpers import inputs, layer
from tinymoe.engine.tensor import Tensor
from tinymoe.nn import MoE


# ----- bad arguments and inputs -----------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=5), ValueError, "top_k"),
    (dict(top_k=1.5), (ValueError, TypeError), "top_k"),
    (dict(capacity_factor=0), ValueError, "capacity_factor"),
    (dict(capacity_factor=-0.5), ValueError, "capacity_factor"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
    (dict(capacity_factor="1.0"), (ValueError, TypeError), "capacity_factor"),
    (dict(router="top2"), ValueError, "router"),
    (dict(router="Softmax"), ValueError, "router"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation="geglu"), ValueError, "activation"),
    (dict(n_shared_experts=-1), ValueError, "n_shared_experts"),
    (dict(jitter=-0.1), ValueError, "jitter"),
    (dict(jitter=1.0), ValueError, "jitter"),
    (dict(bias_update_rate=0.01, router="softmax"), ValueError, "bias_update_rate"),
    (dict(bias_update_rate=-0.01, router="sigmoid"), ValueError, "bias_update_rate"),
    (dict(dtype="int32"), TypeError, "dtype"),
    (dict(dtype="float16"), TypeError, "float16"),  # CUDA-only
]


@pytest.mark.parametrize("options, error, argument", BAD_ARGUMENTS,
                         ids=[f"{next(iter(o))}={list(o.values())[0]!r}" for o, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_raise_errors_naming_the_argument(options, error, argument):
    with pytest.raises(error, match=argument):
        MoE(6, 5, 4, **{"top_k": 2, **options})


def test_an_infinite_capacity_factor_is_refused_or_dropless():
    try:
        moe = layer(capacity_factor=float("inf"))
    except ValueError as error:
        assert "capacity_factor" in str(error)
        return
    moe(inputs((6, 6)))
    assert moe.stats.dropped_fraction == 0.0


@pytest.mark.parametrize("argument", ["capacity_factor", "jitter"])
def test_numpy_scalar_arguments_are_accepted(argument):
    moe = layer(**{argument: np.float32(0.5)})
    assert moe(inputs((6, 6))).shape == (6, 6)


def test_wrong_last_dimension_names_d_model(device):
    moe = layer(device=device)
    for shape in [(5, 7), (5, 5), (6, 1)]:
        with pytest.raises(ValueError, match="d_model=6"):
            moe(inputs(shape, device=device))


def test_integer_input_is_rejected(device):
    moe = layer(device=device)
    with pytest.raises(TypeError, match="x"):
        moe(np.ones((5, 6), dtype=np.int64))
    integer_tensor = Tensor(np.ones((5, 6), dtype=np.int64))  # a Tensor holding integers slipped past tm.tensor
    with pytest.raises(TypeError, match="int64"):
        moe(integer_tensor)


@pytest.mark.parametrize("layer_dtype, input_dtype", [("float64", "float32"), ("float32", "float64")])
def test_dtype_mismatch_between_input_and_layer_names_both(layer_dtype, input_dtype):
    moe = layer(dtype=layer_dtype)
    with pytest.raises(TypeError, match=f"(?s)(?=.*{layer_dtype})(?=.*{input_dtype})"):
        moe(inputs((5, 6), dtype=input_dtype))
