"""Batches of (input, target) token windows from a token split, shuffled per epoch and resumable.

The split is cut into windows of `seq_len + 1` tokens starting at every multiple of `seq_len`, so neighbouring
windows share one token and every token is a target exactly once per epoch. Each epoch visits the windows in a
permutation drawn from `numpy.random.default_rng((seed, epoch))`; the loader's whole state is therefore two
integers (epoch, position), and a restored loader yields exactly the batches the original would have yielded
(the pattern lmforge.data.batches.ShuffledRows implements for every such source).

With several ranks, rank `r` takes batches r, r + world_size, ... of the shared per-epoch order, so ranks read
disjoint windows and all ranks take the same number of batches per epoch (they stay in lockstep).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from lmforge.data.batches import ShuffledRows


class TokenSource(Protocol):
    n_tokens: int

    def slice(self, start: int, stop: int) -> np.ndarray: ...


def check_batch_layout(seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    """The checks every loader makes of its row shape and its place among the ranks."""
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


class BatchLoader(ShuffledRows):
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
        n_tokens = int(split.n_tokens)
        super().__init__(max(0, (n_tokens - 1) // seq_len), batch_size, seed, rank, world_size)
        self.split = split
        self.seq_len = seq_len
        self.n_windows = self.n_rows
        if self.batches_per_epoch == 0:
            needed = batch_size * world_size * seq_len + 1
            raise ValueError(
                f"token split too short for one batch: seq_len={seq_len} x batch_size={batch_size}"
                f"{f' x world_size={world_size}' if world_size > 1 else ''} needs at least {needed} tokens, "
                f"the split has n_tokens={n_tokens}"
            )

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        windows = self._next_rows()
        rows = np.empty((self.batch_size, span), dtype=np.int64)
        for i, w in enumerate(windows):
            start = int(w) * self.seq_len
            rows[i] = self.split.slice(start, start + span)
        tokens = torch.from_numpy(rows)
        # Contiguous copies, so loss code may .view() them.
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
