"""Basic layers: Linear, Embedding, RMSNorm, LayerNorm, Dropout."""
from __future__ import annotations

from .. import functional as F
from ..engine.checks import require_int
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
        generator = as_generator(generator)
        bound = init.fan_in_bound(self.in_features)
        self.weight = init.uniform((self.out_features, self.in_features), bound, generator, dtype, device)
        self.bias = init.uniform((self.out_features,), bound, generator, dtype, device) if bias else None

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
        self.weight = init.normal((self.num_embeddings, self.embedding_dim), std, generator, dtype, device)

    def forward(self, indices):
        return F.embedding(indices, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(Module):
    """y = x / sqrt(mean(x², −1) + eps) · weight;  weight (dim,) initialised to ones."""

    def __init__(self, dim, eps=1e-6, dtype="float32", device="cpu"):
        super().__init__()
        self.dim, self.eps = require_int(dim, "dim", "norm", low=1), float(eps)
        self.weight = init.constant((self.dim,), 1.0, dtype, device)

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(Module):
    """y = (x − mean) / sqrt(var + eps) · weight + bias over the last axis;  weight ones, bias zeros."""

    def __init__(self, dim, eps=1e-5, dtype="float32", device="cpu"):
        super().__init__()
        self.dim, self.eps = require_int(dim, "dim", "norm", low=1), float(eps)
        self.weight = init.constant((self.dim,), 1.0, dtype, device)
        self.bias = init.constant((self.dim,), 0.0, dtype, device)

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout in training mode (zero with probability p, scale the rest by 1/(1−p)); identity in eval."""

    def __init__(self, p=0.1, generator=None):
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p={p!r} must be in [0, 1]")
        self.p = float(p)
        self.generator = as_generator(generator)

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training, generator=self.generator)

    def extra_repr(self):
        return f"p={self.p}"
