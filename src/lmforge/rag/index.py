"""The retrieval index: built from a folder, kept on disk, updated incrementally, opened for search.

An index folder holds:
- `manifest.json`: the settings (chunk_tokens, overlap, embedder), each indexed file's size, mtime (ns), sha256
  and chunk count, the skipped files by reason, and the counts of the last build;
- `chunks.jsonl`: one chunk a line (id, file, start_line, end_line, page, text, heading), files in path order;
- `bm25/`: the BM25 index in bm25s's own format (NumPy arrays saved without pickle, JSON vocabulary and params);
- `embeddings.npy`: with an embedder, one unit-norm float32 row per chunk, in chunks.jsonl's order.

`build_index` re-reads only what changed: a file whose size and mtime match the manifest is kept as it was
(chunks and embeddings), as is one whose content hash still matches (only touched); any other file is re-chunked
(and re-embedded), a file gone from the folder loses its chunks. Changing chunk_tokens, overlap or the embedder
rebuilds everything. BM25 is refit on all chunks each build (it is fast: corpus statistics change with any file).
The whole folder is written to a staging folder and swapped in, so a reader never sees half an index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from lmforge.data.base_reader import ErrorLog
from lmforge.io import atomic_write_json, staged_dir
from lmforge.rag.chunking import Chunk, chunk_document
from lmforge.rag.documents import Document, paragraphs, read_document, source_files
from lmforge.rag.retrieve import CheckpointEmbedder, Embed, Hit, build_bm25, search

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST, CHUNKS, BM25_DIR, EMBEDDINGS = "manifest.json", "chunks.jsonl", "bm25", "embeddings.npy"


@dataclass
class IndexStats:
    """What a build did: files seen, kept (unchanged), added, changed, removed; chunks in all and newly made."""

    files: int = 0
    kept: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    chunks: int = 0
    new_chunks: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Index:
    """Chunks with their BM25 index and (optionally) embeddings; `search` retrieves (lmforge.rag.retrieve)."""

    def __init__(self, chunks: Sequence[Chunk], bm25: bm25s.BM25 | None, embeddings: np.ndarray | None = None,
                 embed: Embed | None = None, embedder: str | None = None,
                 path: Path | None = None) -> None:  # fmt: skip
        self.chunks = list(chunks)
        self.bm25 = bm25
        self.embeddings = embeddings
        self._embed = embed
        self.embedder = embedder  # the checkpoint the embeddings came from, loaded on the first dense search
        self.path = path

    @property
    def embed(self) -> Embed | None:
        if self._embed is None and self.embedder is not None and self.embeddings is not None:
            self._embed = CheckpointEmbedder(self.embedder)
        return self._embed

    @classmethod
    def open(cls, path: str | Path) -> Index:
        """The index in folder `path` (written by `build_index`)."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"{path}: no {MANIFEST}; build the index with `lmforge rag index DIR -o {path}`")
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        chunks = _read_chunks(path / CHUNKS)
        bm25 = bm25s.BM25.load(path / BM25_DIR, allow_pickle=False, show_progress=False) if chunks else None
        emb = np.load(path / EMBEDDINGS, allow_pickle=False) if (path / EMBEDDINGS).is_file() else None
        return cls(chunks, bm25, emb, None, manifest.get("embedder"), path)

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The `k` best chunks for `query`; mode "hybrid" (BM25 + dense by reciprocal rank), "bm25" or "dense"."""
        embed = self.embed if mode != "bm25" else None
        return search(self.chunks, self.bm25, self.embeddings, embed, query, k, mode)


def _read_chunks(path: Path) -> list[Chunk]:
    chunks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            try:
                chunks.append(Chunk.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a chunk record ({e}); rebuild the index") from e
    return chunks


def _embedder(embedder: str | Path | Embed | None) -> tuple[Embed | None, str | None]:
    """(the embedding function, the checkpoint path recorded in the manifest)."""
    if embedder is None:
        return None, None
    if isinstance(embedder, (str, Path)):
        return CheckpointEmbedder(embedder), str(Path(embedder).resolve())
    return embedder, getattr(embedder, "path", None)


def _embed_all(embed: Embed | None, chunks: Sequence[Chunk]) -> np.ndarray | None:
    if embed is None:
        return None
    return embed([c.search_text for c in chunks]) if chunks else np.empty((0, 0), dtype=np.float32)


def build_memory_index(texts: list[tuple[str, str]], *, embedder: str | Path | Embed | None = None,
                       chunk_tokens: int = 200, overlap: int = 40) -> Index:  # fmt: skip
    """An in-memory index of (doc id, text) pairs: each text is read as plain text (paragraphs) and chunked, and
    every chunk's `file` is its doc id. `embedder`: a checkpoint, a function texts -> unit-norm rows, or None."""
    chunks: list[Chunk] = []
    for doc_id, text in texts:
        lines = text.splitlines()
        chunks += chunk_document(Document(doc_id, paragraphs(lines), lines), chunk_tokens, overlap)
    embed, name = _embedder(embedder)
    bm25 = build_bm25([c.search_text for c in chunks]) if chunks else None
    return Index(chunks, bm25, _embed_all(embed, chunks), embed, name)


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _previous(out: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[int]], list[Chunk],
                                                            np.ndarray | None]:  # fmt: skip
    """The old index's files, each file's chunk rows, its chunks and embeddings, when its settings match."""
    if not (out / MANIFEST).is_file():
        return {}, {}, [], None
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or any(manifest.get(k) != v for k, v in settings.items()):
        log.info("%s: settings changed, rebuilding the whole index", out)
        return {}, {}, [], None
    chunks = _read_chunks(out / CHUNKS)
    rows: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        rows.setdefault(c.file, []).append(i)
    emb = np.load(out / EMBEDDINGS, allow_pickle=False) if (out / EMBEDDINGS).is_file() else None
    return manifest["files"], rows, chunks, emb


def build_index(source: Path, out: Path, *, embedder: str | Path | Embed | None = None, chunk_tokens: int = 200,
                overlap: int = 40) -> IndexStats:  # fmt: skip
    """Index the documents of folder `source` into folder `out`, incrementally (see the module docstring)."""
    began = time.perf_counter()
    source, out = Path(source), Path(out)
    errors = ErrorLog()
    files = source_files(source, errors)
    embed, name = _embedder(embedder)
    settings = {"chunk_tokens": chunk_tokens, "overlap": overlap, "embedder": name}
    old_files, old_rows, old_chunks, old_emb = _previous(out, settings)
    stats = IndexStats(files=len(files))
    chunks: list[Chunk] = []
    rows: list[int | None] = []  # per chunk: its row in the old embeddings, or None when new
    manifest_files: dict[str, Any] = {}
    for path, rel in files:
        meta = _fingerprint(path)
        old = old_files.get(rel)
        if old is not None and (old["size"], old["mtime_ns"]) == (meta["size"], meta["mtime_ns"]):
            meta["sha256"] = old["sha256"]
        else:
            meta["sha256"] = _sha256(path)
        if old is not None and old["sha256"] == meta["sha256"]:
            kept = old_rows.get(rel, [])
            chunks += [old_chunks[i] for i in kept]
            rows += kept
            stats.kept += 1
            count = len(kept)
        else:
            doc = read_document(path, rel, errors)
            new = chunk_document(doc, chunk_tokens, overlap) if doc is not None else []
            chunks += new
            rows += [None] * len(new)
            count = len(new)
            stats.new_chunks += len(new)
            stats.added += old is None
            stats.changed += old is not None
            if doc is None:
                continue  # not indexed (counted in errors); tried again next build
        manifest_files[rel] = {**meta, "chunks": count}
    stats.removed = len(set(old_files) - {rel for _, rel in files})
    stats.chunks = len(chunks)
    embeddings = _merge_embeddings(embed, chunks, rows, old_emb)
    stats.skipped = errors.reasons
    stats.seconds = round(time.perf_counter() - began, 3)
    _write(out, settings, manifest_files, chunks, embeddings, stats, errors)
    return stats


def _merge_embeddings(embed: Embed | None, chunks: list[Chunk], rows: list[int | None],
                      old: np.ndarray | None) -> np.ndarray | None:  # fmt: skip
    """Old rows for kept chunks, fresh embeddings for new ones."""
    if embed is None:
        return None
    new = [i for i, r in enumerate(rows) if r is None or old is None]
    fresh = _embed_all(embed, [chunks[i] for i in new])
    if not chunks:
        return fresh
    dim = fresh.shape[1] if len(new) else old.shape[1]
    out = np.empty((len(chunks), dim), dtype=np.float32)
    if new:
        out[new] = fresh
    for i, r in enumerate(rows):
        if r is not None and old is not None:
            out[i] = old[r]
    return out


def _write(out: Path, settings: dict[str, Any], files: dict[str, Any], chunks: list[Chunk],
           embeddings: np.ndarray | None, stats: IndexStats, errors: ErrorLog) -> None:  # fmt: skip
    with staged_dir(out) as tmp:
        with open(tmp / CHUNKS, "w", encoding="utf-8", newline="") as f:
            for c in chunks:
                f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        if chunks:
            build_bm25([c.search_text for c in chunks]).save(tmp / BM25_DIR, show_progress=False)
        if embeddings is not None:
            np.save(tmp / EMBEDDINGS, embeddings, allow_pickle=False)
        atomic_write_json(tmp / MANIFEST, {"format": FORMAT, **settings, "files": files, "stats": stats.to_dict(),
                                           "skipped": errors.to_dict()})  # fmt: skip
