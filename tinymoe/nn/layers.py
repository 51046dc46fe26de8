"""Basic layers: Linear, Embedding, RMSNorm, LayerNorm, Dropout."""
from __future__ import annotations

from .. import functional as F
from ..engine.backend import normalize_device
from ..engine.checks import require_bool, require_int, require_number
from ..engine.random import as_generator
from . import init
from .module import Module


class Linear(Module):
    """y = x @ weight.T + bias;  weight (out_features, in_features) (torch layout).

    Initialisation: weight and bias ~ U(−1/sqrt(in_features), 1/sqrt(in_features)), as in torch.
    """

    def __init__(self, in_features, out_features, bias=True, dtype="float32", device="cpu", generator=None):
        super().__init__()
        self.in_features = require_int(in_features, "in_features", "Linear", low=1)
        self.out_features = require_int(out_features, "out_features", "Linear", low=1)
        bias = require_bool(bias, "bias", "Linear")
        shapes = {"weight": (self.out_features, self.in_features), **({"bias": (self.out_features,)} if bias else {})}
        init.require_memory("Linear", shapes, dtype, {"in_features": self.in_features,
                                                      "out_features": self.out_features}, normalize_device(device))
        generator = as_generator(generator)
        bound = init.fan_in_bound(self.in_features)
        self.weight = init.uniform(shapes["weight"], bound, generator, dtype, device)
        self.bias = init.uniform(shapes["bias"], bound, generator, dtype, device) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """out[...] = weight[indices[...]];  weight (num_embeddings, embedding_dim) ~ N(0, std²) (torch: std 1)."""

    def __init__(self, num_embeddings, embedding_dim, std=1.0, dtype="float32", device="cpu", generator=None):
        super().__init__()
        self.num_embeddings = require_int(num_embeddings, "num_embeddings", "Embedding", low=1)
        self.embedding_dim = require_int(embedding_dim, "embedding_dim", "Embedding", low=1)
        std = require_number(std, "std", "Embedding", low=0.0)
        shape = (self.num_embeddings, self.embedding_dim)
        init.require_memory("Embedding", {"weight": shape}, dtype, {"num_embeddings": self.num_embeddings,
                                                                    "embedding_dim": self.embedding_dim},
                            normalize_device(device))
        self.weight = init.normal(shape, std, generator, dtype, device)

    def forward(self, indices):
        return F.embedding(indices, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class _Norm(Module):
    """A normalisation over the last axis of width `dim` with a weight of ones (and, `with_bias`, a bias of zeros)."""

    def __init__(self, dim, eps, dtype, device, with_bias):
        super().__init__()
        op = type(self).__name__
        self.dim = require_int(dim, "dim", op, low=1)
        self.eps = require_number(eps, "eps", op, low=0.0)
        init.require_memory(op, {"weight": (self.dim,), **({"bias": (self.dim,)} if with_bias else {})}, dtype,
                            {"dim": self.dim}, normalize_device(device))
        self.weight = init.constant((self.dim,), 1.0, dtype, device)
        if with_bias:
            self.bias = init.constant((self.dim,), 0.0, dtype, device)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class RMSNorm(_Norm):
    """y = x / sqrt(mean(x², −1) + eps) · weight;  weight (dim,) initialised to ones."""

    def __init__(self, dim, eps=1e-6, dtype="float32", device="cpu"):
        super().__init__(dim, eps, dtype, device, with_bias=False)

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)


class LayerNorm(_Norm):
    """y = (x − mean) / sqrt(var + eps) · weight + bias over the last axis;  weight ones, bias zeros."""

    def __init__(self, dim, eps=1e-5, dtype="float32", device="cpu"):
        super().__init__(dim, eps, dtype, device, with_bias=True)

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Inverted dropout in training mode (zero with probability p, scale the rest by 1/(1−p)); identity in eval."""

    def __init__(self, p=0.1, generator=None):
        super().__init__()
        self.p = require_number(p, "p", "Dropout", low=0.0, high=1.0)
        self.generator = as_generator(generator)

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training, generator=self.generator)

    def extra_repr(self):
        return f"p={self.p}"
