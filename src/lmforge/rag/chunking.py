"""Chunks: a document's blocks packed, in order, into passages of at most `chunk_tokens` tokens.

The token count is an estimate that needs no tokenizer: whitespace-separated words (a BPE token is about 0.75 of
an English word, so 200 "tokens" are some 270 model tokens). A chunk never crosses a section: blocks under one
heading (and, in a PDF, on one page) are packed together; a new heading or page starts a new chunk. When a chunk
is full the next one starts with its last blocks of at most `overlap` words, so a passage cut at a chunk boundary
is also whole in one chunk. A block longer than `chunk_tokens` (a long function, a long paragraph) is cut into
windows of whole lines, overlapping by at most `overlap` words; a single line is never cut.

Every chunk records its file, its lines (1-based, inclusive; within the page for a PDF), its page and heading. For
line-based formats its text is exactly those source lines; for HTML it is the extracted text of its blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any

from lmforge.rag.documents import Block, Document


@dataclass(frozen=True)
class Chunk:
    """A retrievable passage; `id` is `file#n` (n counts the file's chunks from 0)."""

    id: str
    file: str
    start_line: int
    end_line: int
    page: int | None
    text: str
    heading: str | None

    @property
    def where(self) -> str:
        """`file:start-end` (`file:p3:start-end` for a PDF page): what a citation names."""
        page = f"p{self.page}:" if self.page is not None else ""
        lines = f"{self.start_line}" if self.start_line == self.end_line else f"{self.start_line}-{self.end_line}"
        return f"{self.file}:{page}{lines}"

    @property
    def search_text(self) -> str:
        """What retrieval scores: the heading (for its words) and the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chunk:
        return cls(**{k: d[k] for k in ("id", "file", "start_line", "end_line", "page", "text", "heading")})


def words(text: str) -> int:
    """The token estimate: whitespace-separated words."""
    return len(text.split())


def _windows(block: Block, chunk_tokens: int, overlap: int) -> Iterator[Block]:
    """A long block as windows of whole lines of at most chunk_tokens words, overlapping by at most overlap."""
    lines = block.text.split("\n")
    exact = len(lines) == block.end_line - block.start_line + 1  # HTML blocks need not map line for line
    start = 0
    while start < len(lines):
        end, size = start, words(lines[start])
        while end + 1 < len(lines) and size + words(lines[end + 1]) <= chunk_tokens:
            end += 1
            size += words(lines[end])
        first, last = block.start_line, block.end_line
        if exact:
            first, last = block.start_line + start, block.start_line + end
        yield Block("\n".join(lines[start : end + 1]), first, last, block.heading, block.page)
        if end + 1 >= len(lines):
            return
        back, kept = end, 0
        while back > start and kept + words(lines[back]) <= overlap:
            kept += words(lines[back])
            back -= 1
        start = back + 1


def _pieces(blocks: list[Block], chunk_tokens: int, overlap: int) -> list[Block]:
    out: list[Block] = []
    for b in blocks:
        out += _windows(b, chunk_tokens, overlap) if words(b.text) > chunk_tokens else [b]
    return out


def _packs(pieces: list[Block], chunk_tokens: int, overlap: int) -> Iterator[list[Block]]:
    """Consecutive pieces of one section, at most chunk_tokens words a pack; a new pack repeats the last pieces of
    the one before, up to overlap words (never all of them, so every pack adds something)."""
    start = 0
    while start < len(pieces):
        end, size = start, words(pieces[start].text)
        while end + 1 < len(pieces) and size + words(pieces[end + 1].text) <= chunk_tokens:
            end += 1
            size += words(pieces[end].text)
        yield pieces[start : end + 1]
        if end + 1 >= len(pieces):
            return
        back, kept = end, 0
        while back > start and kept + words(pieces[back].text) <= overlap:
            kept += words(pieces[back].text)
            back -= 1
        start = back + 1


def chunk_document(doc: Document, chunk_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    """The chunks of `doc` (see the module docstring)."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise ValueError(f"need chunk_tokens >= 1 and 0 <= overlap < chunk_tokens, got {chunk_tokens} and {overlap}")
    chunks: list[Chunk] = []
    for _, section in groupby(doc.blocks, key=lambda b: (b.heading, b.page)):
        for pack in _packs(_pieces(list(section), chunk_tokens, overlap), chunk_tokens, overlap):
            first, last, page = pack[0].start_line, max(p.end_line for p in pack), pack[0].page
            text = doc.span_text(first, last, page)
            if text is None:
                text = "\n".join(p.text for p in pack)
            chunks.append(Chunk(f"{doc.file}#{len(chunks)}", doc.file, first, last, page, text, pack[0].heading))
    return chunks
