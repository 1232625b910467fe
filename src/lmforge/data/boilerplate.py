"""Boilerplate: lines repeated across many documents (cookie notices, navigation, share buttons, footers).

Removal takes two passes over the corpus. The first counts, for every distinct line, how many distinct documents
contain it (its document frequency; a line repeated inside one document, or a document copied several times,
counts once). Lines are compared after stripping surrounding whitespace and lower-casing, and hashed to 64 bits;
the count keeps 16 bytes per distinct line of each document. The second pass deletes from each document every line whose document frequency reaches `min_docs`; a
document left with no text is dropped as "boilerplate only".

Short lines are exempt (`min_chars`): a blank line, "}" or "Reply" repeat everywhere without being boilerplate
worth counting, and deleting them would only break layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def line_key(line: str) -> str:
    return line.strip().lower()


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def document_lines(text: str, min_chars: int) -> set[int]:
    """The hashes of the distinct countable lines of one document."""
    keys = {line_key(line) for line in text.split("\n")}
    return {_hash64(k) for k in keys if len(k) >= min_chars}


class LineCounter:
    """The (line hash, document hash) pairs of a shard, mergeable across shards.

    A document is identified by a hash of its whitespace-normalised text, so copies of one page (in the same shard
    or not) count once: a line is boilerplate when it appears on many different pages, and duplicate pages are the
    deduplication step's business, not this one's.
    """

    def __init__(self) -> None:
        self.pairs: set[tuple[int, int]] = set()

    def add(self, text: str, min_chars: int) -> None:
        doc = _hash64(" ".join(text.split()))
        self.pairs.update((h, doc) for h in document_lines(text, min_chars))

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(line hashes, document hashes), sorted: a deterministic on-disk form."""
        pairs = np.array(sorted(self.pairs), dtype=np.uint64).reshape(len(self.pairs), 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()


def frequent_lines(parts: Iterable[tuple[np.ndarray, np.ndarray]], min_docs: int) -> np.ndarray:
    """The sorted line hashes found in at least `min_docs` distinct documents over all `parts`."""
    arrays = list(parts)
    if not arrays:
        return np.empty(0, dtype=np.uint64)
    pairs = np.stack([np.concatenate([h for h, _ in arrays]), np.concatenate([d for _, d in arrays])], axis=1)
    lines = np.unique(pairs, axis=0)[:, 0]  # one row per distinct (line, document): the line's documents
    unique, counts = np.unique(lines, return_counts=True)
    return unique[counts >= min_docs]


class BoilerplateRemover:
    """Deletes the lines whose hash is in a sorted array of frequent-line hashes."""

    def __init__(self, frequent: np.ndarray, min_chars: int) -> None:
        self.frequent = frozenset(int(h) for h in frequent)
        self.min_chars = min_chars

    def strip(self, text: str) -> tuple[str, int]:
        """`text` without its boilerplate lines, and the number of lines removed."""
        if not self.frequent:
            return text, 0
        kept, removed = [], 0
        for line in text.split("\n"):
            key = line_key(line)
            if len(key) >= self.min_chars and _hash64(key) in self.frequent:
                removed += 1
            else:
                kept.append(line)
        if not removed:
            return text, 0
        return "\n".join(kept).strip("\n") + ("\n" if text.endswith("\n") else ""), removed
