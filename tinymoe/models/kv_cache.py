"""`KVCache`: the keys and values a decoder has already computed, so that decoding one more token costs one
row of attention instead of re-running the whole context.

Each layer keeps a preallocated buffer keys (B, Hkv, capacity, D) and values (B, Hkv, capacity, Dv). A forward
over L new tokens writes their keys/values at [length, length + L) and attends over [0, length + L); the
queries then sit at positions length .. length + L − 1, which is what `grouped_query_attention` assumes
(query i is at Lk − Lq + i). `advance(L)` moves `length` on once every layer has written.

DeepSeek-V3's latent attention (hf_mla.py) stores its compressed latent in the keys slot (B, 1, capacity,
kv_lora_rank) and its rotated shared rope key in the values slot (B, 1, capacity, qk_rope_head_dim).

The cache is for inference only: its buffers hold plain arrays, so no gradient flows through cached keys.
"""
from __future__ import annotations

from ..engine.autograd import is_grad_enabled
from ..engine.backend import array_module
from ..engine.checks import require_int
from ..engine.tensor import Tensor


class KVCache:
    """Keys and values of `n_layers` attention layers for a batch of `batch` sequences of up to `capacity` tokens.

    length: tokens cached so far (the position of the next token). Buffers are allocated by the first
    `update` of each layer, in the dtype and on the device of its keys. derived: a dict where a model's
    decoding path keeps what it collects once per decoding (hf_decoding.layer_arrays), dropped with the cache.
    """

    def __init__(self, n_layers: int, batch: int, capacity: int):
        self.n_layers = require_int(n_layers, "n_layers", "KVCache", low=1)
        self.batch = require_int(batch, "batch", "KVCache", low=1)
        self.capacity = require_int(capacity, "capacity", "KVCache", low=1)
        self.length = 0
        self._keys = [None] * self.n_layers
        self._values = [None] * self.n_layers
        self.derived = {}

    def update(self, layer: int, keys: Tensor, values: Tensor):
        """Write the new keys (B, Hkv, L, D) and values (B, Hkv, L, Dv) of `layer` after the cached ones and
        return (all keys, all values) as Tensors (B, Hkv, length + L, ·) that share the buffers' memory."""
        if is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            raise RuntimeError("KVCache.update: the cache is for inference; run decoding under tinymoe.no_grad()")
        keys, values = self.append(layer, keys.data, values.data)
        return Tensor(keys), Tensor(values)

    def append(self, layer: int, keys, values):
        """`update` on plain arrays (the decoding fast path): write keys (B, Hkv, L, D) and values (B, Hkv, L, Dv)
        in place after the cached ones and return views (B, Hkv, length + L, ·) of the buffers."""
        if keys.shape[0] != self.batch:
            raise ValueError(f"KVCache.update: keys have batch {keys.shape[0]}, the cache was made for {self.batch}")
        new = keys.shape[2]
        end = self.length + new
        if end > self.capacity:
            raise ValueError(f"KVCache.update: {self.length} cached + {new} new tokens exceed capacity={self.capacity}")
        if self._keys[layer] is None:
            xp = array_module(keys)
            self._keys[layer] = xp.zeros(keys.shape[:2] + (self.capacity, keys.shape[3]), dtype=keys.dtype)
            self._values[layer] = xp.zeros(values.shape[:2] + (self.capacity, values.shape[3]), dtype=values.dtype)
        self._keys[layer][:, :, self.length:end] = keys
        self._values[layer][:, :, self.length:end] = values
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Count `new_tokens` more cached tokens (after every layer has called `update` with them)."""
        self.length += require_int(new_tokens, "new_tokens", "KVCache.advance", low=0)

    def __repr__(self):
        return f"KVCache(n_layers={self.n_layers}, batch={self.batch}, length={self.length}, capacity={self.capacity})"
