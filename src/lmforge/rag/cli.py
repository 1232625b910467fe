"""`lmforge rag index|ask`: build or update an index of a folder of documents, and answer a question from it with
checked citations (docs/rag.md). Heavy imports wait until a command runs, so `lmforge --help` stays fast."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from lmforge import verbs

log = logging.getLogger(__name__)

rag_app = typer.Typer(help="Answer questions from your documents with cited sources (docs/rag.md).",
                      no_args_is_help=True)  # fmt: skip


@rag_app.command("index")
def index_cmd(
    source: Path = typer.Argument(..., help="The folder of documents (.txt .md .html .pdf and source code)."),
    out: Path = typer.Option(..., "--out", "-o", help="The index folder (made, or updated incrementally)."),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="A checkpoint whose embeddings (lmforge "
                                            "embed) add dense retrieval; without it, BM25 alone."),
    chunk_tokens: int = typer.Option(200, "--chunk-tokens", min=1, help="At most this many words a chunk."),
    overlap: int = typer.Option(40, "--overlap", min=0, help="Words a chunk repeats of the one before."),
) -> None:
    """Index a folder: re-reads only files added or changed since the last run and drops deleted ones."""
    from lmforge.rag.index import build_index

    try:
        stats = build_index(source, out, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        verbs.fail(str(e), 2)
    typer.echo(f"{out}: {stats.files} files ({stats.kept} unchanged, {stats.added} added, {stats.changed} changed, "
               f"{stats.removed} removed), {stats.chunks} chunks ({stats.new_chunks} new) in {stats.seconds:.2f} s")
    if stats.skipped:
        typer.echo("skipped: " + ", ".join(f"{reason}: {n}" for reason, n in stats.skipped.items()))


@rag_app.command("ask")
def ask_cmd(
    index: Path = typer.Argument(..., help="An index folder (lmforge rag index)."),
    question: str = typer.Argument(..., help="The question."),
    model: Path = typer.Option(..., "--model", "-m", help="The model that answers (a chat checkpoint)."),
    k: int = typer.Option(4, "--k", min=1, help="Chunks retrieved and shown to the model."),
    mode: str = typer.Option("hybrid", help="hybrid, bm25 or dense."),
    threshold: Optional[float] = typer.Option(None, help="Refuse below this coverage of the question by the best "
                                              "chunk (default 0.3; docs/rag.md)."),  # 0.3: rag.answer.THRESHOLD
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="At most this many answer tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer and citations as one JSON object."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Answer a question from the index's documents; then list each citation with its file:lines and whether the
    cited chunk supports the sentence citing it."""
    from lmforge.infer.loading import load_for_generation
    from lmforge.rag.answer import answer, citation_lines
    from lmforge.rag.index import Index

    try:
        idx = Index.open(index)
        lm, tok = load_for_generation(model, device)
        result = answer(idx, lm, tok, question, k=k, mode=mode, max_new_tokens=max_tokens, threshold=threshold)
    except (FileNotFoundError, ValueError) as e:
        verbs.fail(str(e), 2)
    if as_json:
        typer.echo(json.dumps({"answer": result.text, "refused": result.refused,
                               "citations": [c.to_dict() for c in result.citations],
                               "sources": [h.chunk.where for h in result.hits]}, ensure_ascii=False))  # fmt: skip
        return
    typer.echo(result.text)
    if result.citations:
        typer.echo("\nCitations:")
        for line in citation_lines(result.citations):
            typer.echo(f"  {line}")
    elif not result.refused:
        typer.echo("\n(no citations)")
