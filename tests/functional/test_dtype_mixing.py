"""Mixing float32 and float64 Tensors in one functional op is a TypeError naming the op and both dtypes
(the engine's dtype rule, tinymoe/engine/tensor.py); constants and bool conditions adapt."""
import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F


def t(shape, dtype):
    return tm.tensor(np.ones(shape), dtype=dtype)


MIXED_CALLS = [
    ("linear", lambda: F.linear(t((2, 3), "float32"), t((4, 3), "float64"))),
    ("linear", lambda: F.linear(t((2, 3), "float64"), t((4, 3), "float64"), t((4,), "float32"))),
    ("matmul", lambda: F.matmul(t((2, 3), "float32"), t((3, 2), "float64"))),
    ("mse_loss", lambda: F.mse_loss(t((2, 3), "float64"), t((2, 3), "float32"))),
    ("rms_norm", lambda: F.rms_norm(t((2, 3), "float32"), t((3,), "float64"))),
    ("layer_norm", lambda: F.layer_norm(t((2, 3), "float64"), None, t((3,), "float32"))),
    ("concatenate", lambda: F.concatenate([t((2, 3), "float32"), t((2, 3), "float64")])),
    ("stack", lambda: F.stack([t((2, 3), "float64"), t((2, 3), "float32")])),
    ("where", lambda: F.where(np.array(True), t((2, 3), "float32"), t((2, 3), "float64"))),
    ("scaled_dot_product_attention",
     lambda: F.scaled_dot_product_attention(t((2, 3), "float32"), t((2, 3), "float64"), t((2, 3), "float32"))),
]


@pytest.mark.parametrize("op, call", MIXED_CALLS, ids=[f"{op}-{i}" for i, (op, _) in enumerate(MIXED_CALLS)])
def test_mixed_float_dtypes_are_refused_naming_both(op, call):
    with pytest.raises(TypeError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{op}: ") and "float32" in message and "float64" in message
    assert ".astype()" in message


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_where_scalars_and_a_bool_tensor_condition_adapt(dtype):
    x = tm.tensor([-1.0, 2.0], dtype=dtype)
    out = F.where(x > 0, x, np.float64(-np.inf))
    assert out.dtype == np.dtype(dtype)
    assert out.numpy().tolist() == [-np.inf, 2.0]
