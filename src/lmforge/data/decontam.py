"""Decontamination: remove (or flag) training documents that contain text from evaluation sets.

The evaluation files are JSON Lines (one record per line) or JSON (one array or object). Every string anywhere in
a record (dict values and list items, recursively: `query`, each of `choices`, `context`, `continuation`,
`question`, `answer`, ...) is one eval text. Each eval text is normalised like the near-duplicate shingles
(lowercase, punctuation and underscores as word breaks, whitespace collapsed) and contributes:

- every word n-gram (default n = 13, as in GPT-3's decontamination) when it has at least n words;
- its whole word sequence as one gram when it has fewer than n but at least `min_short_words` (default 8) words,
  so short questions still count;
- nothing when it is shorter still: answers such as "signs" or "a marsh" would match ordinary text everywhere.

Grams are stored as stable 64-bit hashes in one sorted numpy array per eval file (8 bytes a gram), so a document
is checked with a vectorised binary search and the files it overlaps can be named.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.base_filter import Filter
from lmforge.data.minhash import ngram_hashes, normalized_words, word_hashes
from lmforge.data.base_reader import Document

log = logging.getLogger(__name__)

_MODES = ("drop", "flag")
_EVAL_SUFFIXES = (".jsonl", ".json")


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, depth first in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def eval_texts(path: Path) -> Iterator[str]:
    """Every string of every record in a JSON Lines or JSON eval file; a malformed line names its file and line."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed json in eval file: {e.msg}") from e
                yield from _strings(record)
    else:
        yield from _strings(json.loads(path.read_text(encoding="utf-8")))


def _eval_files(sources: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(display name, path) of each eval file: a file by its name, a directory's .jsonl/.json files by their path
    relative to it, in sorted order."""
    found = []
    for source in sources:
        root = Path(source)
        if root.is_file():
            found.append((root.name, root))
        elif root.is_dir():
            paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _EVAL_SUFFIXES)
            found.extend((p.relative_to(root).as_posix(), p) for p in paths)
        else:
            raise FileNotFoundError(f"eval source {root} does not exist")
    if not found:
        raise ValueError(f"no .jsonl or .json eval files found in {[str(s) for s in sources]}")
    return found


def eval_text_grams(text: str, n: int = 13, min_short_words: int = 8) -> tuple[np.ndarray, int | None]:
    """An eval text's grams (module docstring), and the length of its one short gram when it is a short text."""
    ids = word_hashes(normalized_words(text))
    if len(ids) >= n:
        return ngram_hashes(ids, n), None
    if len(ids) >= min_short_words:
        return ngram_hashes(ids, len(ids)), len(ids)
    return np.empty(0, dtype=np.uint64), None


class Decontaminator(Filter):
    """Drops ("contaminated") or flags documents sharing at least `min_overlaps` grams with the eval texts.

    `mode="drop"` drops them; `mode="flag"` keeps them with
    `meta["contamination"] = {"ngrams": k, "eval_files": [names]}`, where k counts the document's distinct grams
    found in any eval file and the names (sorted) are those of the files holding at least one of them.
    """

    name = "decontaminate"

    def __init__(
        self,
        eval_sources: Iterable[str | Path],
        n: int = 13,
        min_overlaps: int = 1,
        mode: str = "drop",
        min_short_words: int = 8,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"decontamination mode={mode!r}: allowed values are {list(_MODES)}")
        if n < 1 or min_overlaps < 1 or min_short_words < 1:
            raise ValueError(f"n={n}, min_overlaps={min_overlaps} and min_short_words={min_short_words} must be >= 1")
        self.n = n
        self.min_overlaps = min_overlaps
        self.mode = mode
        self.min_short_words = min_short_words
        # Gram lengths below n that some short eval text used: a document is also cut into grams of those lengths.
        self.short_lengths: set[int] = set()
        self.files: list[str] = []
        self._grams: list[np.ndarray] = []
        for label, path in _eval_files(eval_sources):
            self.files.append(label)
            self._grams.append(self._index_file(path))
        log.info("decontamination index: %d grams from %d eval files", self.num_grams, len(self.files))

    @property
    def num_grams(self) -> int:
        return sum(len(g) for g in self._grams)

    def _index_file(self, path: Path) -> np.ndarray:
        parts = []
        for text in eval_texts(path):
            grams, short = eval_text_grams(text, self.n, self.min_short_words)
            if short is not None:
                self.short_lengths.add(short)
            parts.append(grams)
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)

    def doc_grams(self, text: str) -> np.ndarray:
        """The distinct grams of a document at every length the index holds."""
        ids = word_hashes(normalized_words(text))
        grams = [ngram_hashes(ids, length) for length in (self.n, *sorted(self.short_lengths))]
        return np.unique(np.concatenate(grams))

    def overlaps(self, text: str) -> tuple[int, list[str]]:
        """How many of the document's distinct grams occur in the eval files, and which files (sorted names)."""
        grams = self.doc_grams(text)
        hit = np.zeros(len(grams), dtype=bool)
        names = []
        for label, index in zip(self.files, self._grams):
            if len(index) == 0 or len(grams) == 0:
                continue
            pos = np.minimum(np.searchsorted(index, grams), len(index) - 1)
            found = index[pos] == grams
            if found.any():
                names.append(label)
                hit |= found
        return int(np.count_nonzero(hit)), sorted(names)

    def apply(self, doc: Document) -> Document | str:
        count, names = self.overlaps(doc.text)
        if count < self.min_overlaps:
            return doc
        if self.mode == "drop":
            return "contaminated"
        meta = {**doc.meta, "contamination": {"ngrams": count, "eval_files": names}}
        return Document(id=doc.id, text=doc.text, source=doc.source, meta=meta)
