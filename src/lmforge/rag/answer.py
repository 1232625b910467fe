"""Answers from retrieved chunks, with numbered citations checked against the chunks they name.

The prompt is one user message through the model's chat template: `INSTRUCTION`, the sources numbered from 1
(`[n] file:lines` then the chunk's text), then the question. Sources are dropped from the end until the prompt
leaves room for the answer in the model's context; when not even the best one fits (a short context), it is cut
to its first lines that do.

Refusal: before the model is called, the question's *coverage* is measured: the share of its distinct content
words (BM25's terms: lower case, stop words removed) found in the best-covering retrieved chunk (its heading and
text). Below `threshold` (default 0.3: the best chunk has under a third of the question's words; a question names
things the passage answering it does not, "how long ... last" for "lasts three years"), or with no
chunk retrieved, the answer is `NOT_FOUND` and the model is not run. Coverage rather than the BM25 or RRF score,
because it lies in [0, 1] whatever the corpus size or the retrieval mode, so one threshold means the same thing
on every index.

Citations: the answer is split into sentences; each `[n]` (or `[n, m]`) marker cites source n for its sentence
(a marker right after a sentence's full stop belongs to that sentence). A number outside 1..len(sources) is
invalid (no chunk). A valid citation's *support* is the share of the sentence's content words (markers left out)
that occur in the cited chunk; it is supported when support >= `SUPPORT` (0.5). This is a lexical check: it
catches a citation of the wrong source or an invented claim in other words, not a paraphrase that changes a
number's meaning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lmforge.rag.chunking import Chunk
from lmforge.rag.retrieve import Hit, terms

INSTRUCTION = ("Answer the question using only the numbered sources below. After each sentence, cite the sources "
               "it comes from as [n]. If the sources do not contain the answer, say that the documents do not "
               "contain it.")  # fmt: skip
NOT_FOUND = "The documents do not contain the answer to this question."
THRESHOLD = 0.3
SUPPORT = 0.5
log = logging.getLogger(__name__)
_MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_LEADING_MARKERS = re.compile(r"^((?:\[\d+(?:\s*,\s*\d+)*\]\s*)+)(.*)$", re.S)


@dataclass
class Citation:
    """Marker [n] of `sentence`: the chunk it names (None: n was not a given source), its support in [0, 1]."""

    n: int
    chunk: Chunk | None
    supported: bool
    support: float
    sentence: str = ""

    @property
    def valid(self) -> bool:
        return self.chunk is not None

    def to_dict(self) -> dict[str, Any]:
        """The server's citation record (docs/serving.md): n, file, start_line, end_line, supported, plus the
        page, support and validity."""
        c = self.chunk
        return {"n": self.n, "file": c.file if c else None, "start_line": c.start_line if c else None,
                "end_line": c.end_line if c else None, "page": c.page if c else None, "supported": self.supported,
                "support": round(self.support, 4), "valid": self.valid}  # fmt: skip


@dataclass
class Answer:
    text: str
    citations: list[Citation] = field(default_factory=list)
    refused: bool = False
    hits: list[Hit] = field(default_factory=list)


def coverage(question: str, hits: Sequence[Hit]) -> float:
    """The share of the question's distinct content words found in the best-covering hit (0 with no words)."""
    wanted = set(terms(question))
    if not wanted or not hits:
        return 0.0
    return max(len(wanted & set(terms(h.chunk.search_text))) for h in hits) / len(wanted)


def sources_message(question: str, hits: Sequence[Hit]) -> str:
    """The user message: instruction, numbered sources, question."""
    sources = "\n\n".join(f"[{i}] {h.chunk.where}\n{h.chunk.text}" for i, h in enumerate(hits, start=1))
    return f"{INSTRUCTION}\n\nSources:\n\n{sources}\n\nQuestion: {question}"


def fit_hits(tokenizer: Any, question: str, hits: Sequence[Hit], budget: int) -> list[Hit]:
    """The first hits whose message (rendered through the chat template) fits in `budget` tokens. When not even the
    first one fits (a model with a short context), its chunk is cut to its first lines that do (logged; its
    end_line follows); ValueError when not one line fits."""
    from lmforge.infer.chat import user_prompt_ids

    def fits(some: Sequence[Hit]) -> bool:
        return len(user_prompt_ids(tokenizer, sources_message(question, some))) <= budget

    for n in range(len(hits), 0, -1):
        if fits(hits[:n]):
            return list(hits[:n])
    best = hits[0]
    lines = best.chunk.text.split("\n")
    lo, hi = 0, len(lines) - 1  # the most lines that fit lie in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits([_cut(best, lines, mid)]) else (lo, mid - 1)
    if lo == 0:
        raise ValueError(f"the question with one line of its best source does not fit in {budget} prompt tokens: "
                         "ask a shorter question, or use a model with a longer context")  # fmt: skip
    log.info("%s: cut to its first %d of %d lines to fit the model's context", best.chunk.where, lo, len(lines))
    return [_cut(best, lines, lo)]


def _cut(hit: Hit, lines: list[str], n: int) -> Hit:
    """`hit` with its chunk cut to its first n lines (end_line moved when the text is the file's lines)."""
    c = hit.chunk
    exact = c.end_line - c.start_line + 1 == len(lines)
    chunk = replace(c, text="\n".join(lines[:n]), end_line=c.start_line + n - 1 if exact else c.end_line)
    return replace(hit, chunk=chunk)


def sentences(text: str) -> list[str]:
    """The sentences of `text`; markers that open a piece (`Paris is in France. [1] Rome...`) close the one before."""
    out: list[str] = []
    for piece in (p.strip() for p in _SENTENCE_END.split(text)):
        m = _LEADING_MARKERS.match(piece)
        if m and out:
            out[-1] = f"{out[-1]} {m.group(1).strip()}"
            piece = m.group(2).strip()
        if piece:
            out.append(piece)
    return out


def check_citations(text: str, hits: Sequence[Hit], support: float = SUPPORT) -> list[Citation]:
    """Every [n] marker of `text`, per sentence (one citation per sentence and number), in order; see the module
    docstring for validity and support."""
    out: list[Citation] = []
    for sentence in sentences(text):
        numbers = dict.fromkeys(int(n) for m in _MARKER.finditer(sentence) for n in m.group(1).split(","))
        words = set(terms(_MARKER.sub(" ", sentence)))
        for n in numbers:
            if not 1 <= n <= len(hits):
                out.append(Citation(n, None, False, 0.0, sentence))
                continue
            chunk = hits[n - 1].chunk
            share = len(words & set(terms(chunk.search_text))) / len(words) if words else 0.0
            out.append(Citation(n, chunk, share >= support, share, sentence))
    return out


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """The prompt tokens a `context`-token model leaves when the answer may take `max_new_tokens`; the prompt keeps
    at least half the context."""
    return context - min(max_new_tokens, context // 2)


def retrieve_sources(index: Any, tokenizer: Any, question: str, *, k: int, mode: str, threshold: float | None,
                     budget: int | Callable[[], int]) -> tuple[list[Hit], bool]:  # fmt: skip
    """Search `index` for the `k` best chunks for `question` in `mode`, and whether to refuse: with `threshold` set,
    refused when nothing is retrieved or the hits' coverage of the question is below it (the hits come back as
    retrieved); else the first hits whose sources message fits in `budget` prompt tokens (`fit_hits`; its
    ValueError when not one line fits), [] when nothing is retrieved. `threshold` None: never refused. A callable
    `budget` is called only when the hits are fitted, so a refusal need not touch the model."""
    hits = index.search(question, k=k, mode=mode)
    if threshold is not None and (not hits or coverage(question, hits) < threshold):
        return hits, True
    if not hits:
        return [], False
    return fit_hits(tokenizer, question, hits, budget() if callable(budget) else budget), False


def answer(index: Any, model: Any, tokenizer: Any, question: str, *, k: int = 4, threshold: float | None = None,
           max_new_tokens: int = 128, mode: str = "hybrid", temperature: float = 0.0,
           seed: int | None = None) -> Answer:  # fmt: skip
    """Retrieve `k` chunks for `question` from `index`, refuse below `threshold` coverage (None: `THRESHOLD`), else
    generate an answer citing them (greedy by default) and check its citations (see the module docstring)."""
    from lmforge.infer.chat import user_prompt_ids
    from lmforge.infer.engine import cap_new_tokens, generate

    hits, refused = retrieve_sources(index, tokenizer, question, k=k, mode=mode,
                                     threshold=THRESHOLD if threshold is None else threshold,
                                     budget=lambda: prompt_budget(model.args.max_seq_len, max_new_tokens))  # fmt: skip
    if refused:  # the model is not run, nor looked at
        return Answer(NOT_FOUND, [], True, hits)
    context = model.args.max_seq_len
    ids = user_prompt_ids(tokenizer, sources_message(question, hits))
    new = cap_new_tokens(max_new_tokens, context, len(ids))
    out = generate(model, [ids], new, temperature=temperature, stop_ids=tokenizer.stop_ids, seed=seed)[0]
    text = tokenizer.decode(out).strip()
    return Answer(text, check_citations(text, hits), False, hits)


def citation_lines(citations: Sequence[Citation]) -> list[str]:
    """One line per citation: `[n] file:lines supported (support 0.83)`, or why it is not."""
    lines = []
    for c in citations:
        if not c.valid:
            lines.append(f"[{c.n}] invalid: no source {c.n} was given")
        else:
            verdict = "supported" if c.supported else "unsupported"
            lines.append(f"[{c.n}] {c.chunk.where} {verdict} (support {c.support:.2f})")
    return lines


class DocsAugmenter:
    """For `lmforge chat --docs`: called with a user message, it returns the sources message for it (as many of the
    `k` hits as fit in `budget` prompt tokens), or the message unchanged when nothing is retrieved; `notes(reply)`
    then lists the sources that message gave and the reply's citations of them, checked."""

    def __init__(self, index: Any, tokenizer: Any, budget: int, k: int = 4, mode: str = "hybrid") -> None:
        self.index, self.tokenizer, self.budget, self.k, self.mode = index, tokenizer, budget, k, mode
        self.hits: list[Hit] = []  # the sources the last message was sent with

    def __call__(self, text: str) -> str:
        self.hits, _ = retrieve_sources(self.index, self.tokenizer, text, k=self.k, mode=self.mode, threshold=None,
                                        budget=self.budget)  # never refused: the message goes as typed, unsourced
        return sources_message(text, self.hits) if self.hits else text

    def notes(self, reply: str) -> list[str]:
        """The lines shown after a reply: its sources by number and file:lines, then each [n] it cited, checked."""
        if not self.hits:
            return ["(no source was retrieved for this message)"]
        where = ", ".join(f"[{i}] {hit.chunk.where}" for i, hit in enumerate(self.hits, 1))
        return [f"sources: {where}", *citation_lines(check_citations(reply, self.hits))]
