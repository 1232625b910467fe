"""Near-duplicate detection with MinHash and locality-sensitive hashing (LSH).

A document becomes a set of word n-gram "shingles" (default n = 5) over its normalised words: lowercased, with
every run of punctuation or underscores turned into a word break. Each shingle gets a stable 64-bit hash, and
`num_perm = bands * rows` seeded universal hash functions `(a * x + b) mod (2**61 - 1)` map the set to its
signature: the minimum of each function over the shingles. Two signatures agree in one position with probability
equal to the sets' Jaccard similarity, so the fraction of agreeing positions estimates it.

`MinHashDedup` streams documents: the signature is cut into `bands` bands of `rows` values; a document whose band
collides with a kept document's is a candidate pair, confirmed only when the estimated Jaccard of the two full
signatures reaches `threshold`. With 14 bands of 8 rows a pair at Jaccard 0.8 becomes a candidate with
probability 1 - (1 - 0.8**8)**14 = 0.92, at 0.9 with probability 0.9996, at 0.5 with probability 0.05.

Everything is deterministic across runs and processes: words are hashed with BLAKE2b (Python's `hash` is salted
per process), shingles and bands are combined with fixed integer arithmetic, and the hash parameters come from a
seeded numpy generator.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from lmforge.data.base_filter import Filter
from lmforge.data.base_reader import Document

NEAR_DUPLICATE = "near duplicate"  # the drop reason
MERSENNE_61 = np.uint64((1 << 61) - 1)
_LOW_31 = np.uint64((1 << 31) - 1)
_WORD_BREAK = re.compile(r"[\W_]+")
# Shingles are hashed in chunks so the (num_perm x chunk) intermediate stays near 2 MB however long the document.
_CHUNK = 2048
_U64 = np.uint64


def normalized_words(text: str) -> list[str]:
    """Lowercased words with punctuation, underscores and whitespace all treated as breaks."""
    return _WORD_BREAK.sub(" ", text.lower()).split()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the output (wraps mod 2**64)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def word_hashes(words: list[str]) -> np.ndarray:
    """A stable 64-bit hash per word; each distinct word is hashed once, since BLAKE2b per call is the slow part."""
    codes: dict[str, int] = {}
    positions = [codes.setdefault(w, len(codes)) for w in words]
    digests = b"".join(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest() for w in codes)
    distinct = np.frombuffer(digests, dtype="<u8").astype(_U64)
    return distinct[np.asarray(positions, dtype=np.int64)]


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """The 64-bit hash of every run of `n` consecutive word hashes, combined in order (vectorised over positions).

    The running value starts from `n`, so grams of different lengths never share a hash by construction.
    """
    count = len(ids) - n + 1
    if count <= 0:
        return np.empty(0, dtype=_U64)
    h = np.full(count, n, dtype=_U64)
    for i in range(n):
        h = _mix(h ^ ids[i : i + count])
    return h


def shingles(text: str, n: int = 5) -> np.ndarray:
    """The distinct shingle hashes of `text`, sorted.

    A text with fewer than `n` words is one shingle: its whole word sequence. Two short texts then match only when
    their normalised words are identical, and a short text never matches a long one's n-grams.
    """
    ids = word_hashes(normalized_words(text))
    grams = ngram_hashes(ids, n) if len(ids) >= n else ngram_hashes(ids, len(ids))
    if len(grams) == 0:  # no words at all: the empty sequence, so empty texts are duplicates of each other
        grams = np.zeros(1, dtype=_U64)
    return np.unique(grams)


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two shingle sets given as arrays of distinct hashes."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _mod_p(y: np.ndarray) -> np.ndarray:
    """y mod (2**61 - 1) for any uint64 y, using 2**61 = 1 (mod p); works in place on `y`."""
    folded = y >> _U64(61)
    y &= MERSENNE_61
    y += folded
    # Now y < p + 8: y - p wraps to a huge value exactly when y < p, so the minimum is the reduced value.
    np.minimum(y, y - MERSENNE_61, out=y)
    return y


class MinHasher:
    """Seeded universal hash family: `num_perm` functions (a * x + b) mod (2**61 - 1) over 32-bit shingle keys.

    The product a * x needs up to 93 bits, so `a` is split into 30 high and 31 low bits; each partial product fits
    in uint64 and the high one is shifted back modulo the Mersenne prime exactly.
    """

    def __init__(self, num_perm: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        p = int(MERSENNE_61)
        a = rng.integers(1, p, size=num_perm, dtype=np.int64).astype(_U64)
        self._a_hi = (a >> _U64(31))[:, None]
        self._a_lo = (a & _LOW_31)[:, None]
        self._b = rng.integers(0, p, size=num_perm, dtype=np.int64).astype(_U64)[:, None]
        self.num_perm = num_perm

    def signature(self, shingle_hashes: np.ndarray) -> np.ndarray:
        """The MinHash signature (uint64, length `num_perm`, values below 2**61) of a non-empty shingle set."""
        sig = np.full(self.num_perm, MERSENNE_61, dtype=_U64)
        for start in range(0, len(shingle_hashes), _CHUNK):
            # The top 32 bits of the mixed shingle hash are uniform; 32 bits keep both partial products below 2**62.
            x = (shingle_hashes[start : start + _CHUNK] >> _U64(32))[None, :]
            # a_hi * x = q * 2**30 + r, so a_hi * x * 2**31 = q * 2**61 + r * 2**31, and 2**61 = 1 (mod p): the
            # shifted high product is r * 2**31 + q, below 2**61 + 2**32, with no 93-bit intermediate.
            hi = self._a_hi * x
            values = (hi << _U64(31)) & MERSENNE_61
            values += hi >> _U64(30)
            # The lazy sum stays below 2**61 + 2**32 + 2**63 + 2**61 < 2**64, so one reduction at the end suffices.
            values += self._a_lo * x
            values += self._b
            np.minimum(sig, _mod_p(values).min(axis=1), out=sig)
        return sig


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of the sets behind two signatures: the fraction of positions that agree."""
    if a.shape != b.shape:
        raise ValueError(f"signatures differ in length: {a.shape} vs {b.shape}")
    return float(np.count_nonzero(a == b)) / len(a)


class MinHashDedup(Filter):
    """Drops a document that is a near duplicate ("near duplicate") of one kept earlier in the stream.

    A document is dropped when one of its bands equals the same band of a kept document and the two signatures'
    estimated Jaccard is at least `threshold`. The first occurrence in stream order is kept, so a fixed input order
    gives a fixed result. Dropped documents are not indexed. The curate stage runs it inside
    `lmforge.data.dedup.Deduplicator`, after the exact-duplicate check.

    Memory per kept document: the signature, 8 * num_perm bytes (896 at the default 112), plus one bucket entry per
    band in a Python dict (about 115 bytes each, 1.6 KB at 14 bands): 2.5 KB in all as measured by
    `benchmarks/dedup_accuracy.py`, so ten million kept documents need about 25 GB.
    """

    name = "near_duplicate"

    def __init__(
        self, threshold: float = 0.8, bands: int = 14, rows: int = 8, n: int = 5, seed: int = 0
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold={threshold} must be in (0, 1]")
        if bands < 1 or rows < 1 or n < 1:
            raise ValueError(f"bands={bands}, rows={rows} and n={n} must all be at least 1")
        self.threshold = threshold
        self.bands = bands
        self.rows = rows
        self.n = n
        self.hasher = MinHasher(bands * rows, seed)
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
        self._sigs = np.empty((64, bands * rows), dtype=_U64)
        self.kept = 0

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of `text`'s word n-gram shingles."""
        return self.hasher.signature(shingles(text, self.n))

    def band_keys(self, sig: np.ndarray) -> list[int]:
        """The LSH bucket keys of a signature: one 64-bit key per band, folding its rows in order."""
        by_band = sig.reshape(self.bands, self.rows)
        key = np.full(self.bands, self.rows, dtype=_U64)
        for r in range(self.rows):
            key = _mix(key ^ by_band[:, r])
        return key.tolist()

    def _candidates(self, keys: list[int]) -> list[int]:
        found: set[int] = set()
        for bucket, key in zip(self._buckets, keys):
            held = bucket.get(key)
            if held is None:
                continue
            found.update(held if isinstance(held, list) else (held,))
        return sorted(found)

    def _index(self, sig: np.ndarray, keys: list[int]) -> None:
        if self.kept == len(self._sigs):  # doubling keeps appends amortised O(1)
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[self.kept] = sig
        for bucket, key in zip(self._buckets, keys):
            held = bucket.get(key)
            # A bare int for the common one-document bucket saves a list object per entry.
            if held is None:
                bucket[key] = self.kept
            elif isinstance(held, list):
                held.append(self.kept)
            else:
                bucket[key] = [held, self.kept]
        self.kept += 1

    def check_and_add(self, sig: np.ndarray, keys: list[int]) -> bool:
        """True when `sig` is a near duplicate of an indexed signature; otherwise index it and return False.

        Signatures computed elsewhere (in parallel workers) go through here in a fixed order, which gives the same
        decisions as `apply` on the same stream.
        """
        candidates = self._candidates(keys)
        if candidates:
            agree = np.count_nonzero(self._sigs[candidates] == sig, axis=1) / self.num_perm
            if agree.max() >= self.threshold:
                return True
        self._index(sig, keys)
        return False

    def apply(self, doc: Document) -> Document | str:
        sig = self.signature(doc.text)
        return NEAR_DUPLICATE if self.check_and_add(sig, self.band_keys(sig)) else doc
