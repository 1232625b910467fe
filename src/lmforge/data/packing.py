"""Document-aligned sequence packing: whole documents packed by best fit into rows that each start with a BOS.

`BatchLoader` cuts the token stream into fixed windows, so a row usually starts mid-document and mixes documents
freely. `PackedLoader` instead packs documents (every document in the shards is `[bos_id] + tokens`, see
`shards.py`; `bos_id` is the document-start token, EOS for a tokenizer without BOS) into rows of `seq_len + 1` tokens, numbers the documents inside each row (`doc_ids`) so the model can
keep attention within a document, and masks the targets that cross from one document into the next.

Packing a row (`pack_documents`): a buffer holds the next `buffer_docs` pieces of documents in the epoch's
shuffled order. The row takes the largest piece that still fits its free space, again and again (best fit, ties
going to the piece that entered the buffer first), topping the buffer up as pieces leave. (A piece that fills a
row by itself becomes a row as soon as it is read and never enters the buffer.) When no piece fits:

- `fill="crop"` (default): the head of the shortest piece in the buffer is cropped to exactly the free space
  (only when at least 2 slots are free; a single slot would hold a bare BOS and is padded instead);
- `fill="pad"`: the rest of the row is padding (`pad_id`, by default lmforge's `<|pad|>`: the pretrain stage
  passes the tokenizer's own, EOS for an imported tokenizer without PAD; its own
  `doc_ids` value; never a target).

A piece longer than a row, and the tail left over by a crop, are handled by `overflow`:

- `overflow="split"` (default): nothing is dropped. A document longer than a row is cut into a first piece of
  `seq_len + 1` tokens (the document's own BOS and its first `seq_len` tokens) and continuation pieces of at most
  `seq_len` tokens, and a crop's tail becomes a continuation piece too. A continuation piece is given a BOS of
  its own in front (a *synthetic* BOS: it is not a document start in the shards), so every row still starts with
  a BOS and every segment of a row starts with one; the split costs one extra slot and no target (the token
  after a split is predicted from the synthetic BOS instead of its real left context).
- `overflow="drop"`: a document is cropped to its first `seq_len + 1` tokens and a crop's tail is discarded, so
  only real document starts carry a BOS (nanochat's policy). This loses most tokens of a corpus whose documents
  are longer than a row (source files are: on the stdlib at seq_len 256 it drops ~94% of the tokens).

Measured with `epoch_stats` on the stdlib's own files (755 train files, 3.02M tokens, 8192-token BPE, all made by
the project's stages; buffer 1000), as fractions of row slots / of document tokens:

    seq_len  overflow+fill  padding  synthetic BOS  dropped  fitting docs cut
    256      split+crop     0.002%   0.38%          0        2.1%
    256      split+pad      0.031%   0.38%          0        0
    256      drop+crop      0.001%   0              94.0%    48% (cropped)
    1024     split+crop     0.034%   0.09%          0        2.7%
    1024     split+pad      0.038%   0.09%          0        0
    1024     drop+crop      0.039%   0              80.0%    24% (cropped)

so the defaults (split + crop) waste least: no token dropped and >99.6% of the slots hold document tokens. The
price of crop over pad is that a few documents that would fit a row are cut in two (their tail continuing in
another row); pass `fill="pad"` to keep them whole at a little padding (0.03% here, 0.08% / 0.3% on a synthetic
log-normal mix of shorter documents, median 400 tokens). With the stdlib tests included (1616 files, 7.9M tokens)
the split rows agree to within 0.02%, and drop loses 95.1% / 83.7% of the tokens.

Each row of a batch gives `x = row[:-1]`, `y = row[1:]` with `y = -100` wherever the target is the first token
of a segment (a BOS: the previous token belongs to another document) or padding, and `doc_ids = ids[:-1]` with
the segments of the row numbered 0, 1, 2, ... from the left (padding, if any, gets the next number).

Determinism and resume: epoch `e` visits documents in `default_rng((seed, e)).permutation(n_docs)`, cut into
chunks of `chunk_docs` documents. Each chunk is packed on its own (the buffer drains at its end) and its rows are
shuffled with `default_rng((seed, e, chunk, _ROW_STREAM))`, so any chunk's rows can be rebuilt without packing
what came before it. The epoch's rows are the chunks' rows in chunk order; global batch `g` takes rows
`[g * batch_size, (g + 1) * batch_size)` and rank `r` takes global batches `r, r + world_size, ...` (as in
`BatchLoader`), so ranks read disjoint rows and stay in lockstep; rows left over at the end of an epoch that do
not make up `world_size` whole batches are skipped. The state is a few integers: the epoch, the batch position,
and the cursor (chunk, row) of the next unread row; loading it repacks one chunk (milliseconds to tens of
milliseconds for the default chunk of 10k documents). A state holding only epoch and position (the
`BatchLoader` form) is also accepted and replays the epoch's packing up to that position.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from lmforge.data.batches import count_labels
from lmforge.data.loader import check_batch_layout
from lmforge.tokenizer import IGNORE_INDEX, PAD, SPECIAL_TOKENS

DEFAULT_PAD_ID = SPECIAL_TOKENS.index(PAD)
_ROW_STREAM = 0x524F5753  # separates the per-chunk row shuffles from the per-epoch document order
_AFTER = float("inf")  # sorts after any sequence number: (n, _AFTER) follows every buffer entry of size n

Overflow = Literal["split", "drop"]
Fill = Literal["crop", "pad"]


class DocumentSource(Protocol):
    """What `PackedLoader` reads: a token split with the offset of every document's BOS (a `TokenSplit`)."""

    n_tokens: int
    bos_id: int
    doc_starts: np.ndarray

    def slice(self, start: int, stop: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Packing:
    """Rows of packed pieces: row `i` holds `pieces[row_ptr[i]:row_ptr[i + 1]]`, left to right.

    A piece `(doc, offset, n)` is tokens `[offset, offset + n)` of document `doc`; one with `offset > 0` is a
    continuation and takes `n + 1` slots, its synthetic BOS first. `dropped` counts document tokens discarded.
    """

    pieces: np.ndarray  # int64 [n_pieces, 3]
    row_ptr: np.ndarray  # int64 [n_rows + 1]
    dropped: int

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def row(self, i: int) -> np.ndarray:
        return self.pieces[self.row_ptr[i] : self.row_ptr[i + 1]]


def pack_documents(
    lengths: np.ndarray,
    capacity: int,
    buffer_docs: int = 1000,
    overflow: Overflow = "split",
    fill: Fill = "crop",
) -> Packing:
    """Pack documents of the given lengths (in visiting order, each counting its BOS) into rows of `capacity` slots.

    Best fit over a buffer of `buffer_docs` pieces; see the module docstring for the `overflow` and `fill`
    policies. Pieces name documents by their index into `lengths`. A piece that fills a row by itself (a document
    of exactly `capacity` tokens, or a full-size piece of a long one) becomes a row as soon as it is read.
    """
    if capacity < 2:
        raise ValueError(f"capacity must be at least 2, got {capacity}")
    if buffer_docs < 1:
        raise ValueError(f"buffer_docs must be positive, got {buffer_docs}")
    if overflow not in ("split", "drop") or fill not in ("crop", "pad"):
        raise ValueError(f"overflow must be 'split' or 'drop' and fill 'crop' or 'pad', got {overflow!r}, {fill!r}")
    split = overflow == "split"
    pieces: list[tuple[int, int, int]] = []
    row_ptr = [0]
    dropped = 0
    # Buffer entries (slots, seq, doc, offset), sorted; seq (arrival order) makes them unique and breaks ties.
    buf: list[tuple[int, int, int, int]] = []
    seq = 0
    next_doc = 0
    n_docs = len(lengths)

    def whole_row(doc: int, offset: int, n: int) -> None:
        pieces.append((doc, offset, n))
        row_ptr.append(len(pieces))

    def refill() -> None:
        nonlocal next_doc, seq, dropped
        while len(buf) < buffer_docs and next_doc < n_docs:
            doc, length = next_doc, int(lengths[next_doc])
            next_doc += 1
            if length < capacity:
                bisect.insort(buf, (length, seq, doc, 0))
                seq += 1
                continue
            whole_row(doc, 0, capacity)
            if not split:
                dropped += length - capacity
                continue
            offset = capacity
            while length - offset >= capacity - 1:
                whole_row(doc, offset, capacity - 1)
                offset += capacity - 1
            if offset < length:
                bisect.insort(buf, (length - offset + 1, seq, doc, offset))
                seq += 1

    while True:
        refill()
        if not buf:
            break
        row: list[tuple[int, int, int]] = []
        free = capacity
        while free > 0:
            refill()
            if not buf:
                break
            i = bisect.bisect_right(buf, (free, _AFTER))
            if i:
                # The largest piece that fits; among equal sizes the one that has waited longest.
                slots, _, doc, offset = buf.pop(bisect.bisect_left(buf, (buf[i - 1][0],)))
                row.append((doc, offset, slots - (offset > 0)))
                free -= slots
                continue
            if fill == "pad" or free < 2:
                break
            slots, _, doc, offset = buf.pop(0)  # the shortest piece: the smallest tail to carry or drop
            take = free - (offset > 0)
            row.append((doc, offset, take))
            rest = slots - (offset > 0) - take
            if split:
                bisect.insort(buf, (rest + 1, seq, doc, offset + take))
                seq += 1
            else:
                dropped += rest
            free = 0
        if row:
            pieces.extend(row)
            row_ptr.append(len(pieces))
    return Packing(
        pieces=np.asarray(pieces, dtype=np.int64).reshape(-1, 3),
        row_ptr=np.asarray(row_ptr, dtype=np.int64),
        dropped=dropped,
    )


class PackedLoader:
    """Endless iterator of `(x, y, doc_ids)` int64 tensors of shape [batch_size, seq_len] from packed documents; a
    batch source (lmforge.data.batches.BatchSource) with a cursor of its own.

    `y` is `x` shifted by one with -100 at targets that start a segment or are padding; `doc_ids` numbers the
    segments (documents or document pieces) of each row from 0. See the module docstring for the policies.
    """

    def __init__(
        self,
        split: DocumentSource,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        buffer_docs: int = 1000,
        chunk_docs: int = 10_000,
        overflow: Overflow = "split",
        fill: Fill = "crop",
        pad_id: int = DEFAULT_PAD_ID,
    ) -> None:
        check_batch_layout(seq_len, batch_size, rank, world_size)
        if buffer_docs < 1 or chunk_docs < 1:
            raise ValueError(f"buffer_docs and chunk_docs must be positive, got {buffer_docs}, {chunk_docs}")
        if overflow not in ("split", "drop") or fill not in ("crop", "pad"):
            raise ValueError(f"overflow must be 'split' or 'drop' and fill 'crop' or 'pad', got {overflow!r}, {fill!r}")
        starts = np.asarray(split.doc_starts, dtype=np.int64)
        n_tokens = int(split.n_tokens)
        if len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n_tokens:
            raise ValueError(
                f"document offsets must start at 0 and increase strictly below n_tokens={n_tokens} "
                f"({len(starts)} documents)"
            )
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.buffer_docs = buffer_docs
        self.chunk_docs = chunk_docs
        self.overflow = overflow
        self.fill = fill
        self.pad_id = pad_id
        self.bos_id = int(split.bos_id)
        self.capacity = seq_len + 1
        self.n_docs = len(starts)
        self.n_chunks = math.ceil(self.n_docs / chunk_docs)
        self._starts = starts
        self._lengths = np.diff(np.append(starts, n_tokens))
        self.epoch = 0
        self.position = 0  # batches this rank has taken in this epoch
        self._chunk = 0  # cursor: the next unread row of the epoch is row `_row` (shuffled order) of chunk `_chunk`
        self._row = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._cached: tuple[tuple[int, int], Packing, np.ndarray] | None = None
        # Fail here rather than at the first batch when epoch 0 cannot fill one batch on every rank.
        if self._advance(batch_size * world_size, None) is None:
            raise ValueError(self._too_small_message(0))
        self._chunk = self._row = 0

    # --- packing ---------------------------------------------------------------------------------------------

    @property
    def layout(self) -> str:
        """Everything the packing of an epoch depends on besides the epoch; stored in the state to refuse a mismatch."""
        return (
            f"seed={self.seed} seq_len={self.seq_len} docs={self.n_docs} tokens={int(self.split.n_tokens)} "
            f"buffer={self.buffer_docs} chunk={self.chunk_docs} overflow={self.overflow} fill={self.fill}"
        )

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.n_docs)
            self._order_epoch = epoch
        return self._order

    def _pack_chunk(self, epoch: int, chunk: int) -> tuple[Packing, np.ndarray]:
        """Chunk `chunk` of epoch `epoch` packed (pieces naming documents of the split) and its rows' shuffled order."""
        if self._cached is not None and self._cached[0] == (epoch, chunk):
            return self._cached[1], self._cached[2]
        docs = self._epoch_order(epoch)[chunk * self.chunk_docs : (chunk + 1) * self.chunk_docs]
        local = pack_documents(self._lengths[docs], self.capacity, self.buffer_docs, self.overflow, self.fill)
        pieces = local.pieces.copy()
        pieces[:, 0] = docs[pieces[:, 0]]
        packing = Packing(pieces=pieces, row_ptr=local.row_ptr, dropped=local.dropped)
        order = np.random.default_rng((self.seed, epoch, chunk, _ROW_STREAM)).permutation(len(packing))
        self._cached = ((epoch, chunk), packing, order)
        return packing, order

    def _advance(self, n: int, rows: list[tuple[Packing, int]] | None) -> int | None:
        """Move the cursor `n` rows on (appending them to `rows` unless it is None); None, cursor unmoved, when the
        epoch has fewer than `n` rows left."""
        chunk, row, left = self._chunk, self._row, n
        while left:
            if chunk >= self.n_chunks:
                return None
            packing, order = self._pack_chunk(self.epoch, chunk)
            k = min(left, len(order) - row)
            if rows is not None:
                rows.extend((packing, int(r)) for r in order[row : row + k])
            row += k
            left -= k
            if row >= len(order):
                chunk, row = chunk + 1, 0
        self._chunk, self._row = chunk, row
        return n

    def _take_rows(self, n: int) -> list[tuple[Packing, int]] | None:
        """The next `n` rows of the epoch (advancing the cursor), or None when the epoch has fewer left."""
        rows: list[tuple[Packing, int]] = []
        return rows if self._advance(n, rows) is not None else None

    def _materialize(self, packing: Packing, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row `r` of `packing` as (tokens, segment ids, is-target-masked) arrays of `capacity` entries."""
        cap = self.capacity
        tokens = np.full(cap, self.pad_id, dtype=np.int64)
        ids = np.empty(cap, dtype=np.int64)
        masked = np.zeros(cap, dtype=bool)  # position starts a segment or is padding
        pos = 0
        for seg, (doc, offset, n) in enumerate(packing.row(r).tolist()):
            masked[pos] = True
            start = pos
            if offset:
                tokens[pos] = self.bos_id
                pos += 1
            base = int(self._starts[doc]) + offset
            tokens[pos : pos + n] = self.split.slice(base, base + n)
            pos += n
            ids[start:pos] = seg
        if pos < cap:
            ids[pos:] = ids[pos - 1] + 1
            masked[pos:] = True
        return tokens, ids, masked

    # --- iteration and state ---------------------------------------------------------------------------------

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        group = self.batch_size * self.world_size
        rows = self._take_rows(group)
        if rows is None:
            if self.position == 0 and self._chunk == 0 and self._row == 0:
                raise ValueError(self._too_small_message(self.epoch))
            self.epoch += 1
            self.position = 0
            self._chunk = self._row = 0
            rows = self._take_rows(group)
            if rows is None:
                raise ValueError(self._too_small_message(self.epoch))
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        span = self.capacity
        tokens = np.empty((self.batch_size, span), dtype=np.int64)
        ids = np.empty((self.batch_size, span), dtype=np.int64)
        masked = np.empty((self.batch_size, span), dtype=bool)
        for i, (packing, r) in enumerate(mine):
            tokens[i], ids[i], masked[i] = self._materialize(packing, r)
        self.position += 1
        targets = tokens[:, 1:].copy()
        targets[masked[:, 1:]] = IGNORE_INDEX
        return (
            torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
            torch.from_numpy(targets),
            torch.from_numpy(np.ascontiguousarray(ids[:, :-1])),
        )

    def _too_small_message(self, epoch: int) -> str:
        rows = sum(len(self._pack_chunk(epoch, c)[0]) for c in range(self.n_chunks))
        return (
            f"split too small for one batch: batch_size={self.batch_size}"
            f"{f' x world_size={self.world_size}' if self.world_size > 1 else ''} needs "
            f"{self.batch_size * self.world_size} packed rows, epoch {epoch} packs {self.n_docs} documents "
            f"(n_tokens={int(self.split.n_tokens)}) into {rows} rows at seq_len={self.seq_len}"
        )

    def loss_tokens(self, batch: tuple[torch.Tensor, ...]) -> int:
        """The targets of a batch that are trained (not segment starts, not padding)."""
        return count_labels(batch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "chunk": self._chunk,
            "row": self._row,
            "layout": self.layout,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; a state of only epoch and position replays the epoch's packing up to there."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"loader state epoch={epoch}, position={position} is negative")
        if "layout" in state and state["layout"] != self.layout:
            raise ValueError(
                f"loader state was saved for a different packing ({state['layout']}); this loader packs {self.layout}"
            )
        if "chunk" in state:
            chunk, row = int(state["chunk"]), int(state["row"])
            if not 0 <= chunk <= self.n_chunks or row < 0:
                raise ValueError(f"loader state chunk={chunk}, row={row} does not fit {self.n_chunks} chunks")
            self.epoch, self.position, self._chunk, self._row = epoch, position, chunk, row
            return
        saved = self.epoch, self.position, self._chunk, self._row
        self.epoch, self.position, self._chunk, self._row = epoch, position, 0, 0
        if self._advance(position * self.batch_size * self.world_size, None) is None:
            self.epoch, self.position, self._chunk, self._row = saved
            raise ValueError(
                f"loader state epoch={epoch}, position={position} is past the end of that epoch's packed rows"
            )

    # --- measurement -----------------------------------------------------------------------------------------

    def epoch_stats(self, epoch: int = 0) -> dict[str, Any]:
        """Pack a whole epoch (no token is read) and measure it.

        `real_fraction`: row slots holding a token that is not padding (document tokens and synthetic BOS);
        `doc_token_fraction`: row slots holding document tokens; `dropped_fraction`: document tokens discarded by
        cropping; `target_fraction`: slots whose token is a trained target; `whole_doc_fraction`: documents that
        sit whole in one row; `cut_fitting_fraction`: documents short enough for one row that were nevertheless cut
        (by a crop fill); `tail_rows`: rows skipped at the epoch's end (fewer than one group of batches).
        """
        rows = placed = synthetic = segments = dropped = 0
        pieces_per_doc = np.zeros(self.n_docs, dtype=np.int64)
        placed_per_doc = np.zeros(self.n_docs, dtype=np.int64)
        for chunk in range(self.n_chunks):
            packing, _ = self._pack_chunk(epoch, chunk)
            rows += len(packing)
            placed += int(packing.pieces[:, 2].sum())
            synthetic += int(np.count_nonzero(packing.pieces[:, 1]))
            segments += len(packing.pieces)
            dropped += packing.dropped
            np.add.at(pieces_per_doc, packing.pieces[:, 0], 1)
            np.add.at(placed_per_doc, packing.pieces[:, 0], packing.pieces[:, 2])
        slots = rows * self.capacity
        doc_tokens = int(self.split.n_tokens)
        group = self.batch_size * self.world_size
        whole = (pieces_per_doc == 1) & (placed_per_doc == self._lengths)
        fits = self._lengths <= self.capacity
        # A document that fits a row but is not whole in one was cut by a crop fill: split, or cropped (drop).
        cut_fitting = int(np.count_nonzero(fits & ~whole))
        return {
            "rows": rows,
            "batches": rows // group,
            "tail_rows": rows % group,
            "slots": slots,
            "doc_tokens": doc_tokens,
            "placed_tokens": placed,
            "synthetic_bos": synthetic,
            "pad_tokens": slots - placed - synthetic,
            "dropped_tokens": dropped,
            "real_fraction": (placed + synthetic) / slots,
            "doc_token_fraction": placed / slots,
            "dropped_fraction": dropped / doc_tokens,
            "target_fraction": (placed + synthetic - segments) / slots,
            "whole_doc_fraction": int(np.count_nonzero(whole)) / self.n_docs,
            "cut_fitting_fraction": cut_fitting / max(1, int(np.count_nonzero(fits))),
            "mean_segment": (placed + synthetic) / segments,
        }
