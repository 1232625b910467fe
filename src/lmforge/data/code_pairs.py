"""Docstring -> code pairs from Python source: the one extractor behind the sft stage's default data
(signature + docstring -> body, the phi-1 idea) and the embedding retrieval task (docstring summary -> code).

Every documented function, methods and nested functions included, gives one `CodePair` of three parts cut by
lines and dedented by the def's own indentation (so the `def` sits at column 0): `signature` (decorators and def
lines), `docstring` (its lines, quotes included) and `body` (the statements after it, indented one level). Blank
lines between the docstring and the code belong to neither.

A function is left out when its docstring shares a line with the signature or with code (it cannot be cut out by
lines), when nothing follows the docstring, or when a line of it is indented less than its `def` (a multi-line
string flush with the margin: dedenting would change it). `pairs_from_documents` also leaves out a pair whose
prompt repeats one seen before (copies and overloads would blur what held-out means).

Held-out pairs come from held-out files, and a file is held out by one rule: curation's validation split,
`lmforge.data.curate.split_of(file id, data.val_fraction)`. The sft stage reads them from curate/val; `lmforge
embed --pairs stdlib` applies the same rule, at the default run's fraction, to the standard library's files. Either
way the held-out functions come from files pre-training never trained on.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class CodePair:
    id: str  # "path/to/module.py:LINE:Class.method"
    signature: str  # decorators and def lines
    docstring: str  # the docstring's source lines
    body: str  # the statements after the docstring
    summary: str  # the docstring's first paragraph on one line

    @property
    def prompt(self) -> str:
        """Signature and docstring: what a model completes with the body."""
        return f"{self.signature}\n{self.docstring}"

    @property
    def code(self) -> str:
        """The function without its docstring: what a docstring's summary retrieves."""
        return f"{self.signature}\n{self.body}"


def _dedent(lines: list[str], indent: str) -> list[str] | None:
    """Remove the def's own indentation from every line; None when a non-blank line is not indented that far."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
        elif line.startswith(indent):
            out.append(line[len(indent) :])
        else:
            return None
    return out


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Every function under `tree` with its qualified name, in source order."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield node, name
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def function_pairs(source: str, rel: str) -> Iterator[CodePair]:
    """The pair of every documented function of one module's source, in line order.

    Raises SyntaxError (and ValueError for null bytes) when the source does not parse."""
    lines = source.splitlines()
    for node, qualname in _functions(ast.parse(source)):
        if len(node.body) < 2 or ast.get_docstring(node, clean=False) is None:
            continue
        doc, rest = node.body[0], node.body[1:]
        # Parts are cut by lines: a docstring sharing a line with the def or with code cannot be cut out.
        if doc.lineno == node.lineno or rest[0].lineno == doc.end_lineno:
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        def_line = lines[start - 1]
        indent = def_line[: len(def_line) - len(def_line.lstrip())]
        signature = _dedent(lines[start - 1 : doc.lineno - 1], indent)
        docstring = _dedent(lines[doc.lineno - 1 : doc.end_lineno], indent)
        body = _dedent(lines[doc.end_lineno : node.end_lineno], indent)  # type: ignore[misc]
        if signature is None or docstring is None or body is None:
            continue
        while body and not body[0]:
            body.pop(0)
        if body:
            summary = " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
            yield CodePair(f"{rel}:{node.lineno}:{qualname}", "\n".join(signature), "\n".join(docstring),
                           "\n".join(body), summary)  # fmt: skip


def pairs_from_documents(
    docs: Iterable[tuple[str, str]], seen: set[str] | None = None, limit: int | None = None
) -> tuple[list[CodePair], int]:
    """(pairs, files skipped) from (id, source text) documents. Files that do not parse (Python 2 fixtures, text
    that is not Python) are skipped and counted. `seen` holds prompts already used, shared across calls so a
    held-out split can exclude prompts of the training split. Reading stops once `limit` pairs are found (the
    last file's pairs are all kept, so a few more may come back)."""
    seen = set() if seen is None else seen
    pairs: list[CodePair] = []
    bad_files = 0
    for doc_id, text in docs:
        if limit is not None and len(pairs) >= limit:
            break
        try:
            found = list(function_pairs(text, doc_id))
        except (SyntaxError, ValueError):
            bad_files += 1
            continue
        for pair in found:
            if pair.prompt not in seen:
                seen.add(pair.prompt)
                pairs.append(pair)
    return pairs, bad_files
