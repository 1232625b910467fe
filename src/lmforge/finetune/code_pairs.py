"""Instruction pairs derived from Python source: signature + docstring -> function body (the phi-1 idea).

Every documented function becomes one conversation: the user message is the function's decorators, signature and
docstring, the assistant message is the rest of its body, both dedented so the `def` sits at column 0. A model
tuned on these pairs, given a docstring and signature, writes a body and then ends its turn.

The SFT stage of a code recipe derives its training pairs from the curated training split and its held-out pairs
from the curated validation split, so the held-out functions come from files pre-training never trained on.

A function is left out when its docstring shares a line with the signature or with code (it cannot be cut out by
lines), when nothing follows the docstring, when a line of it is indented less than its `def` (a multi-line string
flush with the margin: dedenting would change it), or when its prompt repeats one seen before (copies and
overloads would blur what held-out means).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from lmforge.finetune.data import Conversation, Message


@dataclass(frozen=True)
class CodePair:
    id: str  # "path/to/module.py:LINE:name"
    prompt: str  # decorators + signature + docstring, dedented to the def's column
    body: str  # the statements after the docstring, at the same dedent (so indented one level)

    def conversation(self) -> Conversation:
        return [Message("user", self.prompt), Message("assistant", self.body)]


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


def function_pairs(source: str, rel: str) -> Iterator[CodePair]:
    """The (prompt, body) pair of every documented function of one module's source, in line order.

    Raises SyntaxError (and ValueError for null bytes) when the source does not parse."""
    tree = ast.parse(source)
    lines = source.splitlines()
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(nodes, key=lambda n: n.lineno):
        if len(node.body) < 2 or ast.get_docstring(node, clean=False) is None:
            continue
        doc, rest = node.body[0], node.body[1:]
        if doc.lineno == node.lineno or rest[0].lineno == doc.end_lineno:
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        def_line = lines[start - 1]
        indent = def_line[: len(def_line) - len(def_line.lstrip())]
        prompt = _dedent(lines[start - 1 : doc.end_lineno], indent)
        body = _dedent(lines[doc.end_lineno : node.end_lineno], indent)  # type: ignore[misc]
        if prompt is None or body is None:
            continue
        while body and not body[0]:  # blank lines between the docstring and the code belong to neither
            body.pop(0)
        if body:
            yield CodePair(f"{rel}:{node.lineno}:{node.name}", "\n".join(prompt), "\n".join(body))


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


def completes_function(pair_prompt: str, generated_body: str) -> bool:
    """Whether prompt + generated body parse as one function with at least one statement after its docstring:
    the model wrote a syntactically complete body (an empty reply, or one that wanders off into new top-level
    code, does not count)."""
    try:
        tree = ast.parse(pair_prompt + "\n" + generated_body)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return (len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
            and len(tree.body[0].body) >= 2)  # fmt: skip
