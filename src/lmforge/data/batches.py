"""Batch sources: what the training loop reads batches from, and the one implementation of their resumable state.

A batch source (`BatchSource`) is an endless iterator of batches whose position is a small JSON-able state
(`state_dict` / `load_state_dict`, saved in every checkpoint), and which says how many loss tokens a batch holds
(`loss_tokens`), so the loop can count the loss tokens of a whole step before computing any loss (lmforge.losses).

`ShuffledRows` is the (seed, epoch, position) pattern the token windows, SFT rows and retrieval pairs share;
`BatchesWrapper` is a source made from another one (objectives built on the token windows) that passes its state
through. The packed-documents loader keeps a cursor of its own (lmforge.data.packing) and implements the protocol
directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lmforge.losses import label_count


@runtime_checkable
class BatchSource(Protocol):
    """An endless, resumable iterator of batches."""

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def loss_tokens(self, batch: Any) -> int:
        """The positions (or pairs, rows) of `batch` its loss sums over."""
        ...


def count_labels(batch: Any) -> int:
    """Loss tokens of a labelled batch: a dict's "labels", or the targets of an `(inputs, targets, ...)` tuple,
    that are not IGNORE_INDEX."""
    labels = batch["labels"] if isinstance(batch, dict) else batch[1]
    return int(label_count(labels))


class ShuffledRows:
    """Rows 0..n_rows-1 visited epoch after epoch, epoch e in the order `default_rng((seed, e)).permutation(n_rows)`,
    so the whole state is two integers (epoch, position) and a restored source yields exactly the batches the
    original would have.

    Each batch is this rank's share of a global batch of `batch_size x world_size` rows: rank r takes rows
    [r x batch_size, (r + 1) x batch_size) of it, so ranks read disjoint rows in lockstep and the global batches do
    not depend on the number of ranks. With `carry_over` false an epoch holds whole global batches only (the rows
    left over are skipped) and `position` counts global batches; with it true a global batch runs on into the next
    epoch, no row is skipped, and `position` counts rows.

    Subclasses turn `_next_rows()` (this rank's row indices) into a batch in `__next__`.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 carry_over: bool = False) -> None:  # fmt: skip
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size must be positive and rank in [0, world_size), got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")  # fmt: skip
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.rank, self.world_size, self.carry_over = rank, world_size, carry_over
        self.global_rows = batch_size * world_size
        self.batches_per_epoch = n_rows // self.global_rows  # whole global batches; 0 when there is not one
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), cached for the current epoch

    def __iter__(self) -> ShuffledRows:
        return self

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng((self.seed, self.epoch)).permutation(self.n_rows))
        return self._order[1]

    def _next_rows(self) -> np.ndarray:
        """This rank's row indices of the next global batch, advancing the position."""
        if self.carry_over:
            every = np.empty(self.global_rows, dtype=np.int64)
            for i in range(self.global_rows):
                if self.position >= self.n_rows:
                    self.epoch, self.position = self.epoch + 1, 0
                every[i] = self._permutation()[self.position]
                self.position += 1
            return every[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        first = self.position * self.global_rows + self.rank * self.batch_size
        self.position += 1
        return self._permutation()[first : first + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        limit, unit = (self.n_rows, "rows") if self.carry_over else (self.batches_per_epoch, "batches")
        if epoch < 0 or not 0 <= position <= limit:
            raise ValueError(f"loader state epoch={epoch}, position={position} does not fit this data ({limit} "
                             f"{unit} per epoch); it was saved for other data or another batch size")  # fmt: skip
        self.epoch, self.position = epoch, position

    def loss_tokens(self, batch: Any) -> int:
        return count_labels(batch)


class BatchesWrapper(ABC):
    """A batch source built on another one: it makes its own batches from the inner source's (in `__next__`) and
    passes the state, and by default the loss-token count, through to it."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source

    def __iter__(self) -> BatchesWrapper:
        return self

    @abstractmethod
    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def loss_tokens(self, batch: Any) -> int:
        return self.source.loss_tokens(batch)
