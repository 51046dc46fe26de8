"""Mixing devices in one functional op is an error naming both devices (needs a GPU; skipped elsewhere),
and every public op is exported from tinymoe.functional."""
import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F
from tinymoe.engine.backend import cuda_available, to_device

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")]


def on(device, shape=(2, 3)):
    return tm.tensor(np.ones(shape), dtype="float64", device=device)


# Each entry mixes a cpu tensor (or array) with a cuda one.
MIXED_CALLS = [
    ("linear", lambda: F.linear(on("cpu"), on("cuda", (4, 3)))),
    ("matmul", lambda: F.matmul(on("cpu"), on("cuda", (3, 2)))),
    ("mse_loss", lambda: F.mse_loss(on("cpu"), on("cuda"))),
    ("rms_norm", lambda: F.rms_norm(on("cpu"), on("cuda", (3,)))),
    ("layer_norm", lambda: F.layer_norm(on("cuda"), None, on("cpu", (3,)))),
    ("concatenate", lambda: F.concatenate([on("cpu"), on("cuda")])),
    ("stack", lambda: F.stack([on("cuda"), on("cpu")])),
    ("where", lambda: F.where(np.array(True), on("cpu"), on("cuda"))),
    ("where_condition", lambda: F.where(to_device(np.array(True), "cuda"), on("cpu"), 0.0)),
    ("attention", lambda: F.scaled_dot_product_attention(on("cpu"), on("cuda"), on("cpu"))),
    ("embedding_indices", lambda: F.embedding(to_device(np.array([0]), "cuda"), on("cpu"))),
    ("cross_entropy_targets", lambda: F.cross_entropy(on("cpu"), to_device(np.array([0, 1]), "cuda"))),
    ("cross_entropy_numpy_targets", lambda: F.cross_entropy(on("cuda"), np.array([0, 1]))),
]


@pytest.mark.parametrize("name, call", MIXED_CALLS, ids=[row[0] for row in MIXED_CALLS])
@pytest.mark.parametrize("marks", [pytest.param(None, marks=needs_cuda, id="cuda")])
def test_mixing_devices_names_both(name, call, marks):
    with pytest.raises(tm.DeviceMismatchError, match=r"'cpu'.*'cuda'|'cuda'.*'cpu'"):
        call()


OPS = ["relu", "gelu", "silu", "sigmoid", "softplus", "tanh", "exp", "log", "softmax", "log_softmax", "logsumexp",
       "cross_entropy", "mse_loss", "linear", "matmul", "rms_norm", "layer_norm", "embedding", "dropout",
       "concatenate", "stack", "where", "topk", "one_hot", "scaled_dot_product_attention"]


@pytest.mark.parametrize("name", OPS)
def test_every_op_is_exported_and_documented(name):
    assert name in F.__all__
    op = getattr(F, name)
    assert callable(op) and op.__doc__ and op.__doc__.strip()
