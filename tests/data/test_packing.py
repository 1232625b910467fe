import json

import numpy as np
import pytest
import torch

from lmforge.data.curate import run_curate
from lmforge.data.curated import iter_split_texts
from lmforge.data.packing import DEFAULT_PAD_ID, IGNORE_INDEX, PackedLoader, pack_documents
from lmforge.data.readers import stdlib_root
from lmforge.data.shards import open_split, run_shards
from lmforge.data.config import DataConfig, ShardsConfig
from lmforge.tokenizer import train_tokenizer

BOS = 0
PAD = DEFAULT_PAD_ID
OFFSET = 1000  # a fake document token's value is OFFSET + its position in the split, so it shows where it came from


class DocSplit:
    """Documents of the given lengths held in memory: [BOS, OFFSET + p, ...], p being the token's position."""

    def __init__(self, lengths) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.n_tokens = int(lengths.sum())
        self.tokens = np.arange(self.n_tokens, dtype=np.int64) + OFFSET
        self.tokens[self.doc_starts] = BOS
        self.bos_id = BOS

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


def mixed_lengths(n: int = 300, seed: int = 0) -> np.ndarray:
    """Short, row-sized and several-rows-long documents (lengths count the BOS; the shards stage never writes an
    empty document, so at least 2)."""
    return np.maximum(2, np.random.default_rng(seed).lognormal(3.3, 1.0, n).astype(np.int64))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def rows_of(batches):
    return [tuple(row.tolist()) for x, _, _ in batches for row in x]


def check_batch(x, y, ids, bos=BOS, pad=PAD):
    """The row invariants: BOS first, segments numbered from 0 and changing exactly at a BOS, targets masked
    exactly at segment starts and padding, every other target the next token of the same row."""
    assert x.dtype == y.dtype == ids.dtype == torch.int64 and x.shape == y.shape == ids.shape
    for xr, yr, ir in zip(x.tolist(), y.tolist(), ids.tolist()):
        assert xr[0] == bos and ir[0] == 0
        n_real = next((t for t, v in enumerate(xr) if v == pad), len(xr))
        assert all(v == pad for v in xr[n_real:])
        assert len(set(ir[n_real:])) <= 1 and (n_real == len(xr) or ir[n_real] == ir[n_real - 1] + 1)
        for t in range(1, n_real):
            assert ir[t] - ir[t - 1] == (1 if xr[t] == bos else 0)
        for t in range(len(xr) - 1):
            boundary = xr[t + 1] == bos or xr[t + 1] == pad
            assert (yr[t] == IGNORE_INDEX) == boundary
            if not boundary:
                assert yr[t] == xr[t + 1]
        assert yr[-1] != bos and yr[-1] != pad


def check_fake_targets(x, y):
    # In a DocSplit, a document token's target is the token at the next position: its value plus one.
    for xr, yr in zip(x.tolist(), y.tolist()):
        for a, b in zip(xr, yr):
            if b != IGNORE_INDEX and a != BOS:
                assert b == a + 1


# --- pack_documents ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overflow", ["split", "drop"])
@pytest.mark.parametrize("fill", ["crop", "pad"])
def test_pack_documents_covers_every_token_once(overflow, fill):
    lengths = mixed_lengths()
    cap = 33
    packing = pack_documents(lengths, cap, buffer_docs=20, overflow=overflow, fill=fill)
    slots = packing.pieces[:, 2] + (packing.pieces[:, 1] > 0)
    per_row = np.add.reduceat(slots, packing.row_ptr[:-1])
    assert np.all(per_row <= cap) and np.all(per_row >= 1)
    if fill == "crop":
        # Only the last row, or a row one slot short (a bare BOS is padded, never cropped in), is not full.
        assert np.all((per_row[:-1] == cap) | (per_row[:-1] == cap - 1))
    covered = {d: [] for d in range(len(lengths))}
    for doc, offset, n in packing.pieces.tolist():
        covered[doc].append((offset, n))
    for doc, parts in covered.items():
        parts.sort()
        assert parts and parts[0][0] == 0  # every document's head (its BOS) is in some row
        ends = [o + n for o, n in parts]
        assert all(o == e for (o, _), e in zip(parts[1:], ends))  # contiguous, never overlapping
        if overflow == "split":
            assert ends[-1] == lengths[doc]
        else:
            assert len(parts) == 1 and ends[-1] <= min(lengths[doc], cap)
    assert packing.pieces[:, 2].sum() + packing.dropped == lengths.sum()
    if overflow == "split":
        assert packing.dropped == 0
    else:
        assert not np.any(packing.pieces[:, 1])  # no continuation pieces, so no synthetic BOS


def test_best_fit_takes_the_largest_piece_that_fits():
    # Row 1: 6 (largest), then 3 fills it exactly; row 2: 5, 2 and 1... in buffer order of size.
    packing = pack_documents(np.array([3, 6, 2, 5, 1]), capacity=9, buffer_docs=10, fill="pad")
    rows = [packing.row(i)[:, 0].tolist() for i in range(len(packing))]
    assert rows == [[1, 0], [3, 2, 4]]


def test_crop_fill_and_split_continuations():
    # 12 tokens at capacity 8: a full head row, then 4 tokens continued behind a synthetic BOS (5 slots).
    # Document 1 (12 tokens) at capacity 8: its first 8 tokens fill a row as soon as it is read, and its last 4
    # become a continuation taking 5 slots (a synthetic BOS first).
    packing = pack_documents(np.array([5, 12]), capacity=8, buffer_docs=10)
    rows = [packing.row(i).tolist() for i in range(len(packing))]
    assert rows[0] == [[1, 0, 8]]
    # Document 0 and the continuation both take 5 slots; the one that waited longer goes first. The continuation
    # no longer fits the 3 free slots, so its head is cropped in (BOS + 2 tokens) and its last 2 tokens follow in
    # a third row behind another synthetic BOS.
    assert rows[1] == [[0, 0, 5], [1, 8, 2]]
    assert rows[2] == [[1, 10, 2]]
    dropped = pack_documents(np.array([5, 12]), capacity=8, buffer_docs=10, overflow="drop")
    assert [dropped.row(i).tolist() for i in range(len(dropped))] == [[[1, 0, 8]], [[0, 0, 5]]]
    assert dropped.dropped == 4


# --- PackedLoader on in-memory documents -----------------------------------------------------------------------


def loader(split, **kw):
    args = {"seq_len": 32, "batch_size": 4, "seed": 0, "buffer_docs": 16, "chunk_docs": 60} | kw
    return PackedLoader(split, **args)


@pytest.mark.parametrize("overflow", ["split", "drop"])
@pytest.mark.parametrize("fill", ["crop", "pad"])
def test_rows_start_with_bos_and_mask_document_boundaries(overflow, fill):
    split = DocSplit(mixed_lengths())
    ld = loader(split, overflow=overflow, fill=fill)
    for x, y, ids in take(ld, 30):
        assert x.shape == (4, 32)
        check_batch(x, y, ids)
        check_fake_targets(x, y)


@pytest.mark.parametrize("overflow", ["split", "drop"])
def test_one_epoch_reads_each_document_token_once(overflow):
    lengths = mixed_lengths()
    split = DocSplit(lengths)
    ld = loader(split, batch_size=1, overflow=overflow)  # one row a batch: no row is left over at the epoch's end
    stats = ld.epoch_stats(0)
    batches = take(ld, stats["rows"])
    assert ld.epoch == 0
    next(ld)
    assert (ld.epoch, ld.position) == (1, 1)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    seen = torch.cat([x.flatten(), y[:, -1]])  # the last target of a row is a token no x shows
    positions = (seen[seen >= OFFSET] - OFFSET).sort().values
    assert torch.equal(positions, positions.unique())  # no token twice
    document_tokens = np.setdiff1d(np.arange(split.n_tokens), split.doc_starts)
    real_bos = int((x[:, 0] == BOS).sum())  # rows start with a BOS; count the real document starts separately
    if overflow == "split":
        assert positions.tolist() == document_tokens.tolist()
        assert stats["dropped_tokens"] == 0
    else:
        assert set(positions.tolist()) <= set(document_tokens.tolist())
        assert len(positions) + len(lengths) + stats["dropped_tokens"] == split.n_tokens
        assert int((x == BOS).sum()) == len(lengths)  # only real document starts carry a BOS
    assert real_bos == stats["rows"]
    assert int((x == BOS).sum()) == len(lengths) + stats["synthetic_bos"]


def test_same_seed_same_batches_other_seed_other_rows():
    split = DocSplit(mixed_lengths())
    a, b, c = take(loader(split), 12), take(loader(split), 12), take(loader(split, seed=1), 12)
    assert all(torch.equal(p, q) for s, t in zip(a, b) for p, q in zip(s, t))
    assert rows_of(a) != rows_of(c)


def test_each_epoch_is_packed_from_a_new_order():
    split = DocSplit(mixed_lengths())
    ld = loader(split)
    per_epoch = ld.epoch_stats(0)["batches"]
    first = rows_of(take(ld, per_epoch))
    second = rows_of(take(ld, ld.epoch_stats(1)["batches"]))
    assert ld.epoch == 1 and first != second


@pytest.mark.parametrize("taken", [1, 7, 19, 40])
def test_resume_yields_the_same_batches(taken):
    split = DocSplit(mixed_lengths())
    # 5 chunks and 25 batches an epoch: the resumes land mid-chunk, and the last one in the second epoch.
    original = loader(split, batch_size=16)
    assert original.epoch_stats(0)["batches"] == 25
    take(original, taken)
    state = json.loads(json.dumps(original.state_dict()))
    assert set(state) == {"epoch", "position", "chunk", "row", "layout"}
    restored = loader(split, batch_size=16)
    restored.load_state_dict(state)
    replayed = loader(split, batch_size=16)
    replayed.load_state_dict({"epoch": state["epoch"], "position": state["position"]})  # BatchLoader-style state
    ahead = take(original, 25)
    for other in (restored, replayed):
        for s, t in zip(ahead, take(other, 25)):
            assert all(torch.equal(p, q) for p, q in zip(s, t))
    assert restored.state_dict() == original.state_dict()


def test_state_of_another_packing_is_refused():
    split = DocSplit(mixed_lengths())
    state = loader(split).state_dict()
    with pytest.raises(ValueError, match="different packing"):
        loader(split, seq_len=16).load_state_dict(state)
    with pytest.raises(ValueError, match="past the end"):
        loader(split).load_state_dict({"epoch": 0, "position": 10_000})


def test_ranks_read_disjoint_rows_in_lockstep():
    split = DocSplit(mixed_lengths())
    ranks = [loader(split, rank=r, world_size=2) for r in range(2)]
    n = ranks[0].epoch_stats(0)["batches"]
    seen = [rows_of(take(r, n)) for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = rows_of(take(loader(split), 2 * n))
    # Rank r takes global batches r, r + 2, ...: together they read the single-process rows.
    assert seen[0] == [row for b in range(0, 2 * n, 2) for row in single[4 * b : 4 * b + 4]]
    assert seen[1] == [row for b in range(1, 2 * n, 2) for row in single[4 * b : 4 * b + 4]]


def test_too_small_split_names_the_numbers():
    with pytest.raises(ValueError, match=r"batch_size=8 needs 8 packed rows.*3 documents.*into 2 rows"):
        PackedLoader(DocSplit([10, 20, 30]), seq_len=32, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="world_size=2"):
        PackedLoader(DocSplit([30, 30]), seq_len=32, batch_size=2, seed=0, rank=1, world_size=2, overflow="drop",
                     fill="pad")  # fmt: skip


# --- real shards ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of the curated stdlib `json` and `email` packages, tokenized with a 500-token BPE."""
    root = tmp_path_factory.mktemp("packing")
    src = root / "src"
    for pkg in ("json", "email", "email/mime"):
        for path in sorted((stdlib_root() / pkg).glob("*.py")):
            dest = src / pkg / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    run_curate(DataConfig(source=str(src), val_fraction=0.3, min_chars=0, workers=1, plots=False), root / "curate")
    tok = train_tokenizer(iter_split_texts(root / "curate", "train"), vocab_size=500)
    tok.save(root / "tokenizer.json")
    run_shards(root / "curate", root / "tokenizer.json", ShardsConfig(shard_tokens=20_000), root / "shards")
    return root / "shards"


def test_real_shards_pack_into_valid_rows(shards):
    split = open_split(shards, "train")
    ld = PackedLoader(split, seq_len=128, batch_size=4, seed=0, buffer_docs=50)
    for x, y, ids in take(ld, 10):
        check_batch(x, y, ids, bos=split.bos_id)
        assert int(x.max()) < split.vocab_size


@pytest.mark.parametrize("seq_len", [256, 1024])
def test_packing_efficiency_on_real_shards(shards, seq_len):
    split = open_split(shards, "train")
    capacity = seq_len + 1
    stats = PackedLoader(split, seq_len, 1, seed=0).epoch_stats()
    # Measured on these 27 files (108k tokens): 0.9986 (256) / 0.9916 (1024) of the slots are real tokens, the
    # padding being the epoch's last row; synthetic BOS take 0.4% / 0.1% of the slots; nothing is dropped.
    assert stats["real_fraction"] > (0.998 if seq_len == 256 else 0.99)
    assert stats["pad_tokens"] < capacity and stats["dropped_tokens"] == 0
    assert stats["synthetic_bos"] / stats["slots"] < (0.005 if seq_len == 256 else 0.0015)
    padded = PackedLoader(split, seq_len, 1, seed=0, fill="pad").epoch_stats()
    assert padded["real_fraction"] < stats["real_fraction"]
    # Dropping what does not fit a row (nanochat's policy) loses most of these source files' tokens: 94% / 78%.
    dropped = PackedLoader(split, seq_len, 1, seed=0, overflow="drop").epoch_stats()
    assert dropped["dropped_fraction"] > 0.7
