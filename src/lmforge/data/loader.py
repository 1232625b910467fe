"""Batches of (input, target) token windows from a token split, shuffled per epoch and resumable.

The split is cut into windows of `seq_len + 1` tokens starting at every multiple of `seq_len`, so neighbouring
windows share one token and every token is a target exactly once per epoch. Each epoch visits the windows in a
permutation drawn from `numpy.random.default_rng((seed, epoch))`; the loader's whole state is therefore two
integers (epoch, position), and a restored loader yields exactly the batches the original would have yielded.

With several ranks, rank `r` takes batches r, r + world_size, ... of the shared per-epoch order, so ranks read
disjoint windows and all ranks take the same number of batches per epoch (they stay in lockstep).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch


class TokenSource(Protocol):
    n_tokens: int

    def slice(self, start: int, stop: int) -> np.ndarray: ...


def check_batch_layout(seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    """The checks every loader makes of its row shape and its place among the ranks."""
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


class BatchLoader:
    """Endless iterator of `(x, y)` int64 tensors of shape [batch_size, seq_len], y being x shifted by one."""

    def __init__(
        self,
        split: TokenSource,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_batch_layout(seq_len, batch_size, rank, world_size)
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        n_tokens = int(split.n_tokens)
        self.n_windows = max(0, (n_tokens - 1) // seq_len)
        self.batches_per_epoch = self.n_windows // batch_size // world_size
        if self.batches_per_epoch == 0:
            needed = batch_size * world_size * seq_len + 1
            raise ValueError(
                f"token split too short for one batch: seq_len={seq_len} x batch_size={batch_size}"
                f"{f' x world_size={world_size}' if world_size > 1 else ''} needs at least {needed} tokens, "
                f"the split has n_tokens={n_tokens}"
            )
        self.epoch = 0
        self.position = 0  # index of the next batch within this rank's share of the epoch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            self._order = rng.permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        global_batch = self.position * self.world_size + self.rank
        first = global_batch * self.batch_size
        windows = self._epoch_order()[first : first + self.batch_size]
        span = self.seq_len + 1
        rows = np.empty((self.batch_size, span), dtype=np.int64)
        for i, w in enumerate(windows):
            start = int(w) * self.seq_len
            rows[i] = self.split.slice(start, start + span)
        self.position += 1
        tokens = torch.from_numpy(rows)
        # Contiguous copies, so loss code may .view() them.
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"loader state epoch={epoch}, position={position} does not fit this split "
                f"({self.batches_per_epoch} batches per epoch)"
            )
        self.epoch, self.position = epoch, position
