"""Retrieval-augmented answers over a folder of documents: read, chunk, index (BM25 + embeddings), retrieve by
reciprocal rank fusion, answer with numbered sources and check the citations (docs/rag.md)."""

from lmforge.rag.chunking import Chunk
from lmforge.rag.index import Index, IndexStats, build_index, build_memory_index
from lmforge.rag.retrieve import Hit

__all__ = ["Chunk", "Hit", "Index", "IndexStats", "build_index", "build_memory_index"]
