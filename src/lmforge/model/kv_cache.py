"""The key/value cache the backbone fills during generation.

It lives beside the model, not in the inference engine, because the model's forward takes one and prefix tuning
builds one; the engine, chat and the scorers only create and pass it.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    """Per-layer key/value tensors [B, n_kv_heads, max_len, head_dim]; `pos` counts the positions filled."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache in the model's parameter dtype and device, by default as long as its context."""
        a = model.args
        length = max_len if max_len is not None else a.max_seq_len
        p = next(model.parameters())
        return cls(a.n_layers, batch_size, a.n_kv_heads, length, a.head_dim, device=p.device, dtype=p.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, H, T, D] at `pos` and return all keys/values so far for that layer."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        # Under autocast k/v arrive in a lower precision than the cache; attention needs q, k, v in one dtype.
        return self.k[layer][:, :, :end].to(k.dtype), self.v[layer][:, :, :end].to(v.dtype)

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its n new positions."""
        self.pos += n
