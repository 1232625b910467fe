"""Retrieval: BM25 (bm25s) and dense embeddings (lmforge.embed), fused by reciprocal rank.

- `bm25`: Okapi BM25 over the chunks' heading and text, tokenised by bm25s (lower case, words of two or more
  letters or digits, bm25s's longer English stop word list (`STOPWORDS_EN_PLUS`, 179 words: question words such
  as "how" and "does" included) removed, no stemming); the score is BM25's (Lucene's variant, k1 1.5, b 0.75).
- `dense`: the cosine of the query's embedding with each chunk's (mean-pooled, unit-norm rows of
  `lmforge.embed.embed_texts`, from an lmforge checkpoint or an imported Hugging Face encoder).
- `hybrid` (the default): reciprocal rank fusion of the two rankings' top `CANDIDATES` (at least 4k):
  score(c) = sum over rankings of 1 / (RRF_K + rank(c)), rank counted from 1, RRF_K = 60 (Cormack et al. 2009).
  An index built without an embedder has no dense ranking, so hybrid is BM25 alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN_PLUS

from lmforge.rag.chunking import Chunk

log = logging.getLogger(__name__)
# bm25s sets its logger to DEBUG when imported, which would print its progress notes under every verb; warnings stay.
logging.getLogger("bm25s").setLevel(logging.WARNING)

RRF_K = 60
CANDIDATES = 50
MODES = ("hybrid", "bm25", "dense")
Embed = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk, its score in the search's mode, and its rank (from 1)."""

    chunk: Chunk
    score: float
    rank: int


def terms(text: str) -> list[str]:
    """The words BM25 matches on (see the module docstring)."""
    return _tokenize([text])[0]


def _tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords=STOPWORDS_EN_PLUS, return_ids=False, show_progress=False)


def build_bm25(texts: Sequence[str]) -> bm25s.BM25:
    """A BM25 index of `texts` (at least one)."""
    index = bm25s.BM25()
    index.index(_tokenize(list(texts)), show_progress=False)
    return index


def bm25_ranking(index: bm25s.BM25 | None, n_docs: int, query: str, n: int) -> list[tuple[int, float]]:
    """The top `n` (document, BM25 score) of `query`, best first; documents scoring 0 (no query term) left out."""
    if n_docs == 0:
        return []
    known = [t for t in terms(query) if t in index.vocab_dict]
    if not known:
        return []
    docs, scores = index.retrieve([known], k=min(n, n_docs), show_progress=False, n_threads=1)
    return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def dense_ranking(embeddings: np.ndarray, query_embedding: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The top `n` (row, cosine) of unit-norm `embeddings` against a unit-norm query, best first (ties by row)."""
    scores = embeddings.astype(np.float64) @ query_embedding.astype(np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))[:n]
    return [(int(i), float(scores[i])) for i in order]


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: (item, sum of 1 / (k + rank)) over the rankings (ranks from 1), best first; ties
    keep the order in which items were first seen."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def search(chunks: Sequence[Chunk], bm25: bm25s.BM25, embeddings: np.ndarray | None, embed: Embed | None,
           query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:  # fmt: skip
    """The `k` best chunks for `query` in `mode` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}: allowed values are {list(MODES)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    dense_ok = embeddings is not None and embed is not None and len(chunks) > 0
    if mode == "dense" and not dense_ok:
        raise ValueError("mode 'dense' needs an index built with an embedder (lmforge rag index --embedder CKPT)")
    n = max(CANDIDATES, 4 * k)
    ranked: list[tuple[int, float]]
    if mode == "bm25" or (mode == "hybrid" and not dense_ok):
        ranked = bm25_ranking(bm25, len(chunks), query, n)
    else:
        dense = dense_ranking(embeddings, embed([query])[0], n)
        if mode == "dense":
            ranked = dense
        else:
            lexical = bm25_ranking(bm25, len(chunks), query, n)
            ranked = rrf([[i for i, _ in lexical], [i for i, _ in dense]])
    return [Hit(chunks[i], score, rank) for rank, (i, score) in enumerate(ranked[:k], start=1)]


class CheckpointEmbedder:
    """`embed_texts` with the model of a checkpoint (lmforge's, or an imported Hugging Face model directory)."""

    def __init__(self, path: str | Path, max_len: int = 256) -> None:
        from lmforge.infer.loading import load_for_generation  # torch and the model only when embedding

        self.path = str(path)
        self.model, self.tokenizer = load_for_generation(path, device="cpu")
        self.max_len = min(max_len, self.model.args.max_seq_len)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from lmforge.embed import embed_texts

        return embed_texts(self.model, self.tokenizer, texts, max_len=self.max_len)
