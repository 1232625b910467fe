"""Chat requests with `"rag": true` (an lmforge extension) on a server started with `--docs INDEX`.

The last message must be the user's question. Its chunks are retrieved from the index and measured as
`lmforge rag ask` does (lmforge.rag.answer): below the coverage threshold the reply is `NOT_FOUND` and the model is
not run; otherwise the question is replaced by the numbered-sources message (as many sources as leave room for
the reply) and the reply's `[n]` markers are checked against the chunks they cite. The response carries
`"citations": [{"n", "file", "start_line", "end_line", "page", "supported", "support", "valid", "text"}]`: in the
body, or in a stream's chunk with the finish reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.finetune.data import Message
from lmforge.rag.answer import NOT_FOUND, THRESHOLD, check_citations, retrieve_sources, sources_message
from lmforge.tokenizer import Tokenizer

K = 4  # chunks retrieved per question, as `lmforge rag ask` and `lmforge chat --docs`


@dataclass
class Grounded:
    """A conversation with its question replaced by the sources message, and how to cite a reply to it; or, with
    `refusal` set, the reply to send without running the model."""

    conversation: list[Message]
    cite: Callable[[str], list[dict[str, Any]]] | None = None
    refusal: str | None = None


def ground(index: Any, tokenizer: Tokenizer, conversation: list[Message], budget: int) -> Grounded:
    """Retrieve for the last (user) message and build the grounded conversation; `budget` prompt tokens at most.
    Blocking (BM25, perhaps the embedder's forward): run it off the event loop."""
    question = conversation[-1].content
    hits, refused = retrieve_sources(index, tokenizer, question, k=K, mode="hybrid", threshold=THRESHOLD, budget=budget)
    if refused:
        return Grounded(conversation, lambda text: [], NOT_FOUND)  # a refusal cites nothing

    def cite(text: str) -> list[dict[str, Any]]:
        return [c.to_dict() | {"text": c.chunk.text if c.chunk else None} for c in check_citations(text, hits)]

    return Grounded([*conversation[:-1], Message("user", sources_message(question, hits))], cite)
