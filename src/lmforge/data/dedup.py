"""Deduplication: the one implementation, used by the curate stage and by anything that streams documents.

A `Deduplicator` holds the corpus-level state: the set of exact-content digests seen and, with near-duplicate
removal on, the MinHash LSH index (lmforge.data.minhash). Deciding a document is two steps so the expensive one
can run in parallel:

- `keys(text)`: the document's digest (SHA-1 of the text with runs of whitespace collapsed) and, for near dedup, its
  MinHash signature and band keys. Pure: the curate stage computes these in its parallel `sign` phase.
- `check(keys)`: "duplicate", "near duplicate" or None (keep), remembering the document. Stateful and order
  dependent: the curate stage's serial `decide` step feeds every document through here in input order, so the
  first occurrence is kept and the result never depends on the number of workers.

A text is remembered by each check it passes, whatever later checks decide: a document kept by the exact check is
in the digest set even when the near check or a `max_docs` cap then drops it. `apply` runs both steps on one
document, which makes a `Deduplicator` a `Filter` for streaming use (tests, benchmarks) with exactly the decisions
of the curate stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from lmforge.data.base_filter import Filter
from lmforge.data.base_reader import Document
from lmforge.data.config import DataConfig
from lmforge.data.minhash import NEAR_DUPLICATE, MinHashDedup

DUPLICATE = "duplicate"


def content_digest(text: str) -> bytes:
    """The exact-duplicate key: SHA-1 (20 bytes) of `text` with every run of whitespace collapsed to one space."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()


@dataclass(frozen=True)
class DedupKeys:
    """What `Deduplicator.check` needs of one document; `signature` and `bands` are None without near dedup."""

    digest: bytes
    signature: np.ndarray | None = None
    bands: list[int] | None = None


class Deduplicator(Filter):
    """Exact (`exact`) and near (`near`, a MinHash LSH index) duplicate removal; the first occurrence is kept."""

    name = "dedup"

    def __init__(self, exact: bool = True, near: MinHashDedup | None = None) -> None:
        self.exact = exact
        self.near = near
        self._seen: set[bytes] = set()

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Deduplicator:
        """The deduplication a recipe's `data` section asks for (`dedup`, `near_dedup` and the MinHash settings)."""
        near = None
        if cfg.near_dedup:
            near = MinHashDedup(cfg.near_dedup_threshold, cfg.minhash_bands, cfg.minhash_rows, cfg.shingle_words)
        return cls(exact=cfg.dedup, near=near)

    def keys(self, text: str) -> DedupKeys:
        """The document's digest and, with near dedup, its MinHash signature and LSH band keys."""
        if self.near is None:
            return DedupKeys(content_digest(text))
        sig = self.near.signature(text)
        return DedupKeys(content_digest(text), sig, self.near.band_keys(sig))

    def check(self, keys: DedupKeys) -> str | None:
        """The drop reason of the document behind `keys`, or None to keep it; remembers it (module docstring)."""
        if self.exact:
            if keys.digest in self._seen:
                return DUPLICATE
            self._seen.add(keys.digest)
        if self.near is not None:
            if keys.signature is None or keys.bands is None:
                raise ValueError("near-duplicate removal needs the signature and band keys: compute keys with "
                                 "a Deduplicator whose near index has the same settings")  # fmt: skip
            if self.near.check_and_add(keys.signature, keys.bands):
                return NEAR_DUPLICATE
        return None

    def apply(self, doc: Document) -> Document | str:
        reason = self.check(self.keys(doc.text))
        return doc if reason is None else reason
