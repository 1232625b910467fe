"""Retrieval: BM25 ranking on a constructed corpus, reciprocal rank fusion exactly, dense and hybrid modes."""

import numpy as np
import pytest

from lmforge.rag import build_memory_index
from lmforge.rag.retrieve import RRF_K, rrf

CORPUS = [
    ("cats", "The cat sat on the mat and purred."),
    ("dogs", "A dog barks at the mailman every morning."),
    ("paris", "Paris is the capital of France; the Seine runs through Paris."),
    ("rome", "Rome is the capital of Italy."),
]


def test_bm25_ranks_the_document_with_the_rarer_matching_terms_first():
    index = build_memory_index(CORPUS)
    hits = index.search("capital of France", k=4, mode="bm25")
    # "capital" is in two documents, "france" in one: paris matches both, rome only the commoner term
    assert [h.chunk.file for h in hits] == ["paris", "rome"]
    assert [h.rank for h in hits] == [1, 2]
    assert hits[0].score > hits[1].score > 0
    assert index.search("Paris", k=1)[0].chunk.text == CORPUS[2][1]


def test_bm25_score_matches_the_okapi_formula():
    index = build_memory_index(CORPUS)
    (hit,) = index.search("mailman", k=1, mode="bm25")
    # bm25s's default (Lucene) BM25: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), k1 = 1.5, b = 0.75, tf = 1
    n, df = 4, 1
    lengths = [4, 5, 6, 3]  # content terms per document (stop words removed): cat sat mat purred / ...
    doc_len, avg = lengths[1], sum(lengths) / 4
    idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
    expected = idf * 1 / (1 + 1.5 * (1 - 0.75 + 0.75 * doc_len / avg))
    assert hit.chunk.file == "dogs"
    assert hit.score == pytest.approx(expected, rel=1e-5)


def test_no_matching_term_retrieves_nothing():
    assert build_memory_index(CORPUS).search("quantum chromodynamics", k=3) == []


def test_rrf_is_exact_on_constructed_rankings():
    fused = dict(rrf([[1, 2, 3], [3, 1, 4]]))
    assert fused == pytest.approx({1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 63})
    assert [i for i, _ in rrf([[1, 2, 3], [3, 1, 4]])] == [1, 3, 2, 4]
    assert RRF_K == 60
    assert rrf([[7, 8]], k=0) == [(7, 1.0), (8, 0.5)]


def _toy_embed(texts):
    """A bag of three words as a unit vector: which of cat / dog / capital a text mentions."""
    rows = np.array([[w in t.lower() for w in ("cat", "dog", "capital")] for t in texts], dtype=np.float32) + 1e-3
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_dense_and_hybrid_modes_fuse_by_reciprocal_rank():
    index = build_memory_index(CORPUS, embedder=_toy_embed)
    dense = index.search("kitten cat", k=1, mode="dense")
    assert dense[0].chunk.file == "cats" and dense[0].score == pytest.approx(1.0, abs=1e-2)
    hybrid = index.search("capital France", k=4, mode="hybrid")
    # bm25 ranks paris, rome; dense ranks paris and rome tied (row order), then the rest
    assert [h.chunk.file for h in hybrid][:2] == ["paris", "rome"]
    assert hybrid[0].score == pytest.approx(2 / 61)
    assert hybrid[1].score == pytest.approx(2 / 62)


def test_dense_mode_without_embedder_is_refused():
    with pytest.raises(ValueError, match="embedder"):
        build_memory_index(CORPUS).search("cat", mode="dense")
    with pytest.raises(ValueError, match="allowed values"):
        build_memory_index(CORPUS).search("cat", mode="sparse")
