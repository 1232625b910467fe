"""The key/value cache the backbone fills during generation.

It lives beside the model, not in the inference engine, because the model's forward takes one and prefix tuning
builds one; the engine, chat and the scorers only create and pass it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; lmforge supports 3.10


class _LayerBuffers:
    """What both caches hold: per-layer key and value tensors [rows, n_kv_heads, max_len, head_dim], zeroed."""

    def __init__(self, n_layers: int, rows: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        shape = (rows, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len

    @classmethod
    def _for_model(cls, model: nn.Module, rows: int, max_len: int | None) -> Self:
        """A cache of `rows` in the model's parameter dtype and device, by default as long as its context."""
        a = model.args
        length = max_len if max_len is not None else a.max_seq_len
        p = next(model.parameters())
        return cls(a.n_layers, rows, a.n_kv_heads, length, a.head_dim, device=p.device, dtype=p.dtype)


class KVCache(_LayerBuffers):
    """Per-layer key/value tensors [B, n_kv_heads, max_len, head_dim]; `pos` counts the positions filled."""

    per_row = False  # every row at the same position (see SlotKVCache for one position per row)

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__(n_layers, batch_size, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.pos = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache in the model's parameter dtype and device, by default as long as its context."""
        return cls._for_model(model, batch_size, max_len)

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


class SlotKVCache(_LayerBuffers):
    """Per-layer key/value tensors [slots, n_kv_heads, max_len, head_dim] with one filled length per slot.

    Each slot holds one sequence, at positions 0..lens[slot]-1. Before a forward the caller names the slots its
    batch rows write to (`use`); each row then continues at its own position: the model takes the rotary/learned
    positions from `positions` and the attention mask from `attn_mask` (a row sees only its own filled positions).
    Contiguous rows are read as views without copying, which is why the batching engine keeps its running
    requests in slots 0..n-1 (`move` packs them when one leaves).
    """

    per_row = True

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__(n_layers, slots, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.device = self.k[0].device
        self.lens = [0] * slots
        self.use([])

    @classmethod
    def for_model(cls, model: nn.Module, slots: int, max_len: int | None = None) -> SlotKVCache:
        """A cache in the model's parameter dtype and device, by default as long as its context."""
        return cls._for_model(model, slots, max_len)

    def use(self, rows: list[int]) -> SlotKVCache:
        """Make `rows` (slot per batch row) the slots the next forward reads and writes; returns the cache."""
        self._slots = list(rows)
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            self._rows: slice | torch.Tensor = slice(rows[0], rows[0] + len(rows))
        else:
            self._rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._sync()
        return self

    def _sync(self) -> None:
        """Refresh the rows' starts; the per-forward tensors (positions, mask) are rebuilt on first use."""
        starts = [self.lens[r] for r in self._slots]
        self._pos = max(starts, default=0)
        self._aligned = isinstance(self._rows, slice) and min(starts, default=0) == self._pos
        self._starts = starts
        self._memo: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def aligned(self) -> bool:
        """Every row in use at the same position in contiguous slots: the model then treats the cache like a
        `KVCache` at `pos` (one position range for the batch, SDPA's fast paths), and writes are plain slices."""
        return self._aligned

    @property
    def pos(self) -> int:
        """The furthest filled position among the rows in use (the model checks it against its context)."""
        return self._pos

    def positions(self, n: int) -> torch.Tensor:
        """The positions [B, n] of the next n tokens of each row."""
        if ("pos", n) not in self._memo:
            starts = torch.tensor(self._starts, dtype=torch.long, device=self.device)
            self._memo["pos", n] = starts[:, None] + torch.arange(n, device=self.device)
        return self._memo["pos", n]

    def attn_mask(self, n: int) -> tuple[torch.Tensor | None, bool]:
        """SDPA's (attn_mask, is_causal) for the next n tokens: query i of row b sees key j when j <= lens[b] + i
        (its own filled slots). The mask is [B, 1, n, pos + n] bool; rows aligned at one position need none."""
        if self._aligned and self._pos == 0:
            return None, True
        if self._aligned and n == 1:
            return None, False
        if ("mask", n) not in self._memo:
            keys = torch.arange(self._pos + n, device=self.device)
            self._memo["mask", n] = (keys[None, None, :] <= self.positions(n)[:, :, None])[:, None]
        return self._memo["mask", n], False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, n, D] at each row's own positions; return each row's keys/values [B, H, pos + n, D]."""
        n = k.shape[2]
        end = self._pos + n
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}")
        if self._aligned:
            self.k[layer][self._rows, :, self._pos : end] = k
            self.v[layer][self._rows, :, self._pos : end] = v
        else:
            if ("rows", 0) not in self._memo:
                self._memo["rows", 0] = torch.tensor(self._slots, dtype=torch.long, device=self.device)[:, None]
            pos, rows = self.positions(n), self._memo["rows", 0]
            # index_put needs the cache's dtype (under autocast k/v arrive in a lower one; slices cast by themselves).
            self.k[layer][rows, :, pos] = k.transpose(1, 2).to(self.k[layer].dtype)
            self.v[layer][rows, :, pos] = v.transpose(1, 2).to(self.v[layer].dtype)
        # Contiguous rows are read as views; others are gathered (a copy).
        ck, cv = self.k[layer][self._rows, :, :end], self.v[layer][self._rows, :, :end]
        return ck.to(k.dtype), cv.to(v.dtype)

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its n new positions."""
        for r in self._slots:
            self.lens[r] += n
        self._sync()

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's filled positions into slot dst (which then holds that sequence); src is left as is."""
        n = self.lens[src]
        for k in (*self.k, *self.v):
            k[dst, :, :n] = k[src, :, :n]
        self.lens[dst] = n

    def clear(self, slot: int) -> None:
        self.lens[slot] = 0
