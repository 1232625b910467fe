"""Curate: read a source, run the filters, split train / val, and write the kept documents as JSONL.

Outputs in `out_dir`:
- `train.jsonl`, `val.jsonl`: one `{"id", "text", "source"}` record per line, streamed to temporary files and
  renamed into place only when complete;
- `stats.json`: documents and bytes in, kept and removed per reason (with the first ids removed), the bad records
  the readers skipped, and the split sizes.

A document goes to val when a hash of its id falls below `val_fraction`, so the split does not depend on reading
order or on which other documents exist. To keep both splits usable, when at least two documents are kept and the
hash leaves one split empty, the last document assigned to the other split is moved into it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from lmforge.data.filters import Filter, build_filters
from lmforge.data.io import atomic_write_json, atomic_open
from lmforge.data.readers import Document, ErrorLog, read_documents, read_stdlib
from lmforge.recipe import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_EXAMPLES_PER_REASON = 3


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


@dataclass
class CurationStats:
    """Documents and bytes in, kept and removed per reason. Bytes are UTF-8 bytes of the text as read."""

    docs_in: int = 0
    docs_kept: int = 0
    bytes_in: int = 0
    bytes_kept: int = 0
    removed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, doc: Document, reason: str | None) -> None:
        """Count one document read; `reason` is None when it was kept."""
        size = _utf8_len(doc.text)
        self.docs_in += 1
        self.bytes_in += size
        if reason is None:
            self.docs_kept += 1
            self.bytes_kept += size
            return
        entry = self.removed.setdefault(reason, {"docs": 0, "bytes": 0, "examples": []})
        entry["docs"] += 1
        entry["bytes"] += size
        if len(entry["examples"]) < _EXAMPLES_PER_REASON:
            entry["examples"].append(doc.id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in,
            "docs_kept": self.docs_kept,
            "bytes_in": self.bytes_in,
            "bytes_kept": self.bytes_kept,
            "removed": {reason: dict(entry) for reason, entry in sorted(self.removed.items())},
        }


def split_of(doc_id: str, val_fraction: float) -> Literal["train", "val"]:
    """The split of a document, from a hash of its id alone (stable across runs, machines and Python versions)."""
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if position < val_fraction else "train"


def apply_filters(doc: Document, filters: list[Filter]) -> Document | str:
    """Run `doc` through `filters` in order: the document that survives them all, or the first drop reason."""
    for f in filters:
        result = f.apply(doc)
        if isinstance(result, str):
            return result
        doc = result
    return doc


class _SplitWriter:
    """Streams records to the split files, holding back the latest record of each split.

    Holding one record back is what lets `finish` move a document into a split the hash left empty without
    rewriting a file or keeping the corpus in memory.
    """

    def __init__(self, files: dict[str, IO[str]]) -> None:
        self.files = files
        self.docs = dict.fromkeys(SPLITS, 0)
        self.bytes = dict.fromkeys(SPLITS, 0)
        self._pending: dict[str, tuple[str, int]] = {}
        self.moved: str | None = None

    def add(self, doc: Document, split: str) -> None:
        if split in self._pending:
            self.files[split].write(self._pending[split][0])
        line = json.dumps({"id": doc.id, "text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n"
        size = _utf8_len(doc.text)
        self._pending[split] = (line, size)
        self.docs[split] += 1
        self.bytes[split] += size

    def finish(self) -> None:
        for empty, full in (("val", "train"), ("train", "val")):
            if self.docs[empty] == 0 and self.docs[full] >= 2:
                line, size = self._pending.pop(full)
                self._pending[empty] = (line, size)
                self.docs[full] -= 1
                self.bytes[full] -= size
                self.docs[empty] += 1
                self.bytes[empty] += size
                self.moved = f"last {full} document moved to {empty}"
        for split, (line, _) in self._pending.items():
            self.files[split].write(line)
        self._pending.clear()


def _open_source(cfg: DataConfig, errors: ErrorLog) -> Iterator[Document]:
    if cfg.source == "stdlib":
        return read_stdlib(include_tests=cfg.include_tests, errors=errors)
    return read_documents(cfg.source, text_field=cfg.text_field, extensions=cfg.extensions, errors=errors,
                          text_split=cfg.text_split)  # fmt: skip


def _metrics(stats: CurationStats, splits: _SplitWriter, errors: ErrorLog, seconds: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "docs_in": stats.docs_in,
        "docs_kept": stats.docs_kept,
        "docs_train": splits.docs["train"],
        "docs_val": splits.docs["val"],
        "bytes_train": splits.bytes["train"],
        "bytes_val": splits.bytes["val"],
        "docs_skipped_bad": errors.total,
    }
    for reason, entry in sorted(stats.removed.items()):
        # "gopher: duplicate 5-grams" -> removed_gopher_duplicate_5_grams: a plain identifier for dashboards
        metrics["removed_" + "_".join(re.findall(r"[a-z0-9]+", reason.lower()))] = entry["docs"]
    metrics["seconds"] = round(seconds, 3)
    return metrics


def run_curate(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Curate `cfg.source` into `out_dir` (see the module docstring); returns flat metrics for the manifest.

    `cfg.max_docs` caps the documents kept: reading stops once that many have passed the filters.
    Raises ValueError when no document survives, after writing stats.json so the reasons can be inspected.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    errors = ErrorLog()
    filters = build_filters(cfg)
    stats = CurationStats()
    with atomic_open(out_dir / "train.jsonl") as train, atomic_open(out_dir / "val.jsonl") as val:
        splits = _SplitWriter({"train": train, "val": val})
        for doc in _open_source(cfg, errors):
            result = apply_filters(doc, filters)
            if isinstance(result, str):
                stats.record(doc, result)
                continue
            stats.record(doc, None)
            splits.add(result, split_of(result.id, cfg.val_fraction))
            if cfg.max_docs is not None and stats.docs_kept >= cfg.max_docs:
                break
        splits.finish()
    metrics = _metrics(stats, splits, errors, time.perf_counter() - start)
    report = {
        **stats.to_dict(),
        "skipped_bad": errors.to_dict(),
        "splits": {s: {"docs": splits.docs[s], "bytes": splits.bytes[s]} for s in SPLITS},
        "split_adjustment": splits.moved,
    }
    atomic_write_json(out_dir / "stats.json", report)
    log.info(
        "curate: %d documents in, %d kept (%d train / %d val), %d bad records skipped",
        stats.docs_in, stats.docs_kept, splits.docs["train"], splits.docs["val"], errors.total,
    )
    if stats.docs_kept == 0:
        raise ValueError(
            f"no document of {cfg.source!r} survived curation: "
            f"removed {({r: e['docs'] for r, e in stats.removed.items()})}, "
            f"bad records {errors.reasons}; see {out_dir / 'stats.json'}"
        )
    return metrics


def iter_jsonl_texts(path: Path) -> Iterator[str]:
    """The `text` of each record of a curated JSONL file, streamed."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]
