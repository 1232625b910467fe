"""Batches of rendered preference pairs for the reward-model and DPO-family losses.

A batch of B pairs is one right-padded [2B, T] tensor, the B chosen sequences first and then the B rejected ones,
so a loss runs one forward for both sides. Right padding needs no attention mask: a causal model's real positions
never see the padding after them, and the labels leave the padding out. The pair losses count pairs, not tokens,
so `loss_tokens` is the batch's number of pairs (the loop passes the step's count to the loss as `ctx.tokens`).

The order is lmforge.data.batches.ShuffledRows': epoch e visits the pairs in `default_rng((seed, e))`'s
permutation, the state is {epoch, position}, and under several ranks each takes its own rows of every global
batch, so the global batches do not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lmforge.align.preferences import RenderedPair
from lmforge.data.batches import ShuffledRows
from lmforge.losses import shift_labels
from lmforge.tokenizer import IGNORE_INDEX


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    """Lists of ints as one right-padded [len(rows), longest] long tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate_pairs(pairs: Sequence[RenderedPair], pad_id: int) -> dict[str, Tensor]:
    """One batch of pairs: `input_ids` [2B, T] (chosen rows, then rejected rows), `labels` [2B, T] aligned with the
    logits (lmforge.losses.shift_labels), `lengths` [2B] (each row's real tokens)."""
    if not pairs:
        raise ValueError("no pairs to collate")
    ids = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    labels = [p.chosen_labels for p in pairs] + [p.rejected_labels for p in pairs]
    return {"input_ids": pad_rows(ids, pad_id), "labels": shift_labels(pad_rows(labels, IGNORE_INDEX)),
            "lengths": torch.tensor([len(x) for x in ids], dtype=torch.long)}  # fmt: skip


def split_sides(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row values of a collated batch [2B, ...] -> (chosen [B, ...], rejected [B, ...])."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class PairBatches(ShuffledRows):
    """Endless, resumable batches of `batch_size` pairs (the global batch; each of `world_size` ranks gets its own
    `batch_size / world_size`), reshuffled every epoch; a batch may straddle two epochs. Each batch is
    `collate_pairs`' dict plus `index` [B], the pairs' positions in `pairs` (what a reference cache is keyed by)."""

    def __init__(self, pairs: Sequence[RenderedPair], batch_size: int, pad_id: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        if not pairs:
            raise ValueError("no preference pairs to train on")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} pairs must split evenly over {world_size} ranks")
        super().__init__(len(pairs), batch_size // world_size, seed, rank, world_size, carry_over=True)
        self.pairs, self.pad_id = list(pairs), pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __next__(self) -> dict[str, Tensor]:
        rows = self._next_rows()
        batch = collate_pairs([self.pairs[i] for i in rows], self.pad_id)
        return {**batch, "index": torch.from_numpy(rows).long()}

    def loss_tokens(self, batch: Any) -> int:
        return int(batch["index"].numel())
