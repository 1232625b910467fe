"""Docstring pairs as conversations: signature + docstring -> function body (the phi-1 idea).

The pairs come from `lmforge.data.code_pairs` (the one extractor, shared with the embedding retrieval task). Every
pair becomes one conversation: the user message is the function's decorators, signature and docstring, the
assistant message is the rest of its body. A model tuned on these, given a docstring and signature, writes a body
and then ends its turn; `completes_function` checks that what it wrote completes a function that parses.

The SFT stage of a code recipe derives its training pairs from the curated training split and its held-out pairs
from the curated validation split, so the held-out functions come from files pre-training never trained on.
"""

from __future__ import annotations

import ast

from lmforge.data.code_pairs import CodePair
from lmforge.finetune.data import Conversation, Message


def conversation(pair: CodePair) -> Conversation:
    """The pair as a user turn (signature and docstring) and an assistant turn (the body)."""
    return [Message("user", pair.prompt), Message("assistant", pair.body)]


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
