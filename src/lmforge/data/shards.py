"""Token shards: the curated JSONL tokenized once into flat memory-mappable arrays.

On-disk format (version 1), all in one directory:

- `{split}_{k:05d}.bin` (split is `train` or `val`, k counts from 0): raw token ids, little-endian, `uint16` when the
  vocabulary has at most 65536 entries, else `uint32`, no header. Each document is stored as `[bos_id] + tokens`
  (no EOS): the BOS both separates documents and marks where one starts. A tokenizer without BOS (an imported
  Qwen's) starts each document with its EOS instead, the separator such models are pre-trained with
  (`Tokenizer.doc_start_id`); `bos_id` in the index is that token. A document never straddles two shards; a
  shard is closed when the next document would push it past `shard_tokens` (a single document longer than that gets
  a shard of its own).
- `{split}_{k:05d}.docs.npy`: int64 numpy array of each document's start offset within that shard (where its BOS
  is), in order.
- `index.json`, written last, so a directory without it is not a finished set of shards:

      {"format": 1, "dtype": "uint16", "vocab_size": V, "bos_id": 0, "eos_id": 1,
       "splits": {"train": {"shards": [{"file": "train_00000.bin", "n_tokens": N, "n_docs": D}, ...],
                            "n_tokens": N, "n_docs": D, "n_bytes": B},
                  "val": {...}}}

  where `n_bytes` counts the UTF-8 bytes of the split's document texts (for bits-per-byte).

Every file is written to a temporary name and renamed when complete. Tokenization is deterministic, so the bytes
do not depend on `workers`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from lmforge.data.curated import iter_split_texts
from lmforge.data.curate import SPLITS
from lmforge.io import atomic_open, atomic_write_json
from lmforge.data.config import ShardsConfig
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
_CHUNK_DOCS = 512
_CHUNK_CHARS = 8_000_000  # bounds the memory one encode batch holds, whatever the document sizes


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype holding every id of a `vocab_size` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, k: int) -> str:
    return f"{split}_{k:05d}.bin"


def _docs_name(bin_name: str) -> str:
    return bin_name.removesuffix(".bin") + ".docs.npy"


class _ShardWriter:
    """Appends documents to `{split}_{k:05d}.bin` files, rolling over to a new shard when one is full."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir = out_dir
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._ctx: Any = None
        self._file: IO[bytes] | None = None
        self._starts: list[int] = []
        self._n = 0

    def add(self, tokens: np.ndarray) -> None:
        if self._file is not None and self._n + len(tokens) > self.shard_tokens:
            self._close()
        if self._file is None:
            self._ctx = atomic_open(self.out_dir / shard_name(self.split, len(self.shards)), "wb")
            self._file = self._ctx.__enter__()
        self._starts.append(self._n)
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._n += len(tokens)

    def _close(self) -> None:
        self._ctx.__exit__(None, None, None)
        name = shard_name(self.split, len(self.shards))
        with atomic_open(self.out_dir / _docs_name(name), "wb") as f:
            np.save(f, np.asarray(self._starts, dtype=np.int64))
        self.shards.append({"file": name, "n_tokens": self._n, "n_docs": len(self._starts)})
        self._ctx, self._file, self._starts, self._n = None, None, [], 0

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is None:
            return
        if exc_type is None:
            self._close()
        else:
            # Lets atomic_open delete the half-written shard; the exception itself propagates from here.
            self._ctx.__exit__(exc_type, exc, tb)


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode(tok: Tokenizer, texts: list[str], workers: int) -> list[list[int]]:
    # The Rust batch encoder matched a 2-process pool on 2 cores without pickling or forking, so any parallel
    # setting uses it (its thread pool spans all cores; RAYON_NUM_THREADS caps it). workers=1 stays on one core.
    if workers == 1:
        return [tok.encode(t) for t in texts]
    return tok.encode_batch(texts)


def _write_split(
    tok: Tokenizer, texts: Iterable[str], writer: _ShardWriter, workers: int
) -> tuple[int, int, int]:
    n_tokens = n_docs = n_bytes = 0
    for chunk in _chunks(texts):
        for text, ids in zip(chunk, _encode(tok, chunk, workers)):
            doc = np.empty(len(ids) + 1, dtype=np.int64)
            doc[0] = tok.doc_start_id
            doc[1:] = ids
            writer.add(doc)
            n_tokens += len(doc)
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
    return n_tokens, n_docs, n_bytes


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    for split in SPLITS:
        for path in out_dir.glob(f"{split}_*.bin"):
            if path.name not in keep:
                path.unlink()
                path.with_name(_docs_name(path.name)).unlink(missing_ok=True)


def run_shards(curate_dir: Path, tokenizer_path: Path, cfg: ShardsConfig, out_dir: Path) -> dict[str, Any]:
    """Tokenize the curated `train` and `val` splits of `curate_dir` into shards in `out_dir` (format in the module docstring).

    Streams chunks of documents, so memory stays bounded by one chunk plus one shard's document offsets.
    Returns metrics: train/val tokens and docs, val_bytes, tokens_per_s (whole stage) and seconds.
    """
    start = time.perf_counter()
    curate_dir, out_dir = Path(curate_dir), Path(out_dir)
    tok = Tokenizer.from_file(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Without an index the directory reads as unfinished until every shard of this run is in place.
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        if not (curate_dir / split).is_dir():
            raise FileNotFoundError(f"{curate_dir / split} does not exist; run the curate stage first")
        with _ShardWriter(out_dir, split, dtype, cfg.shard_tokens) as writer:
            texts = iter_split_texts(curate_dir, split)
            n_tokens, n_docs, n_bytes = _write_split(tok, texts, writer, cfg.workers)
        splits[split] = {"shards": writer.shards, "n_tokens": n_tokens, "n_docs": n_docs, "n_bytes": n_bytes}
    _remove_stale(out_dir, {s["file"] for info in splits.values() for s in info["shards"]})
    index = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.doc_start_id,  # the document start: EOS for a tokenizer without BOS (lmforge.tokenizer)
        "eos_id": tok.eos_id,
        "splits": splits,
    }
    atomic_write_json(out_dir / INDEX_FILE, index)
    seconds = time.perf_counter() - start
    total = splits["train"]["n_tokens"] + splits["val"]["n_tokens"]
    metrics = {
        "train_tokens": splits["train"]["n_tokens"],
        "val_tokens": splits["val"]["n_tokens"],
        "train_docs": splits["train"]["n_docs"],
        "val_docs": splits["val"]["n_docs"],
        "train_bytes": splits["train"]["n_bytes"],
        "val_bytes": splits["val"]["n_bytes"],
        "tokens_per_s": round(total / seconds),
        "seconds": round(seconds, 3),
    }
    log.info(
        "shards: %d train / %d validation tokens from %d / %d documents, %.0f tokens/s",
        metrics["train_tokens"], metrics["val_tokens"], metrics["train_docs"], metrics["val_docs"],
        metrics["tokens_per_s"],
    )  # fmt: skip
    return metrics


class TokenSplit:
    """One split of a shard directory as a single virtual token array, memory-mapped shard by shard."""

    def __init__(self, shard_dir: Path, split: str) -> None:
        shard_dir = Path(shard_dir)
        index_path = shard_dir / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} does not exist; run the shards stage (or it did not finish)")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: format {index.get('format')!r}, this lmforge reads {FORMAT_VERSION}")
        if split not in index["splits"]:
            raise ValueError(f"{index_path} has no split {split!r}; splits: {sorted(index['splits'])}")
        info = index["splits"][split]
        self.split = split
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size: int = index["vocab_size"]
        self.bos_id: int = index["bos_id"]
        self.n_tokens: int = info["n_tokens"]
        self.n_docs: int = info["n_docs"]
        self.n_bytes: int = info["n_bytes"]
        self._arrays: list[np.memmap] = []
        starts = []
        offset = 0
        for shard in info["shards"]:
            path = shard_dir / shard["file"]
            self._arrays.append(self._map(path, shard["n_tokens"]))
            shard_starts = np.load(path.with_name(_docs_name(path.name)))
            if len(shard_starts) != shard["n_docs"]:
                raise ValueError(
                    f"{_docs_name(path.name)}: {len(shard_starts)} document offsets, index.json says {shard['n_docs']}"
                )
            starts.append(shard_starts.astype(np.int64) + offset)
            offset += shard["n_tokens"]
        if offset != self.n_tokens:
            raise ValueError(f"{index_path}: {split} shards hold {offset} tokens, the split total says {self.n_tokens}")
        self._offsets = np.cumsum([0] + [len(a) for a in self._arrays], dtype=np.int64)
        self.doc_starts: np.ndarray = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)

    def _map(self, path: Path, n_tokens: int) -> np.memmap:
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in index.json is missing")
        expected = n_tokens * self.dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"shard {path} is {actual} bytes but index.json says {n_tokens} {self.dtype.name} tokens "
                f"({expected} bytes); the shards are incomplete or from another run, rerun the shards stage"
            )
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n_tokens,))

    def __len__(self) -> int:
        return self.n_tokens

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split as int64, read across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"slice [{start}, {stop}) outside the {self.split} split's {self.n_tokens} tokens")
        pieces = []
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            base = int(self._offsets[k])
            end = min(stop, int(self._offsets[k + 1]))
            pieces.append(self._arrays[k][pos - base : end - base])
            pos = end
            k += 1
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(pieces, dtype=np.int64)


def open_split(shard_dir: Path, split: str) -> TokenSplit:
    """Open a split of a shard directory; raises naming the file when the index or a shard is missing or wrong."""
    return TokenSplit(shard_dir, split)
