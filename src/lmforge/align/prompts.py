"""Prompts for reinforcement learning (PPO, GRPO): what the policy answers, and what its rewards check the answer
against.

A `PromptItem` is a conversation ending with a user turn, and a `meta` dict the rewards (lmforge.align.rewards)
read by key: "id", "source" (file:line), "code_prompt", "entry_point", "tests", "test_setup", "answer".

Formats, auto-detected per file from the first record's keys (or named with `format=`):
- `mbpp`: MBPP's `mbpp.jsonl` (`text`, `code`, `test_list`, `test_setup_code`) or `sanitized-mbpp.json` (`prompt`,
  `code`, `test_list`, `test_imports`). The user turn is the task and the tests, as MBPP's prompt shows them ("...
  Your code should pass these tests:" then one assert a line); meta: tests, test_setup (the setup code, or the
  sanitized set's imports), entry_point (the function the tests call) and reference (the dataset's solution).
- `gsm8k`: `question`, `answer`; the user turn is the question, meta answer the number after the answer's last
  "####", commas removed ("1,080" -> "1080").
- `messages`: `messages` [{role, content}] ending with a user turn (a trailing assistant turn is the reference
  reply: kept as meta reference, not shown to the policy).
- `prompt`: `prompt` (a string) with an optional `system`.
A `messages` or `prompt` record may carry the meta keys the rewards read ("id", "answer", "tests", "test_setup",
"code_prompt", "entry_point") at its top level.

Bad records are skipped and counted with their location (`file:line`, or `file[index]` in a JSON array) and a
reason, as lmforge.align.preferences does; they never stop the read.
"""

from __future__ import annotations

import ast
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.code_pairs import CodePair
from lmforge.finetune.code_pairs import conversation
from lmforge.finetune.data import BadRecord, Conversation, Message, Skipped, read_formatted, validate

log = logging.getLogger(__name__)

FORMATS = ("mbpp", "gsm8k", "messages", "prompt")
MBPP_INSTRUCTION = "Your code should pass these tests:"
_TEXT_META = ("id", "answer", "test_setup", "code_prompt", "entry_point")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class PromptItem:
    messages: Conversation  # ends with a user turn
    meta: dict[str, Any]


def detect_format(record: Any) -> str | None:
    """The prompt format a record's keys name, or None."""
    if not isinstance(record, dict):
        return None
    if "test_list" in record and "code" in record:
        return "mbpp"
    if "question" in record and "answer" in record:
        return "gsm8k"
    if "messages" in record:
        return "messages"
    if "prompt" in record:
        return "prompt"
    return None


def _string(record: dict[str, Any], key: str) -> str:
    if key not in record:
        raise BadRecord(f"missing key: {key!r}")
    if not isinstance(record[key], str):
        raise BadRecord(f"wrong type: {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


def _strings(record: dict[str, Any], key: str) -> list[str]:
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRecord(f"wrong type: {key!r} must be a list of strings")
    return [v.replace("\r\n", "\n") for v in value]


def _user_turn(messages: Conversation) -> Conversation:
    """`messages`, checked as a conversation a reply would complete: roles alternate and it ends with the user."""
    if not messages or messages[-1].role != "user":
        raise BadRecord("no user turn last: a prompt must end with the user's message")
    validate([*messages, Message("assistant", "(the reply)")])
    return messages


def _parse(source: str) -> ast.Module:
    with warnings.catch_warnings():  # old datasets' invalid escapes ("\d" in a plain string) are theirs, not ours
        warnings.simplefilter("ignore")
        return ast.parse(source)


def entry_point(code: str, tests: Sequence[str]) -> str:
    """The function the tests call that the reference code defines: the first such call in source order."""
    try:
        defined = {n.name for n in ast.walk(_parse(code)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    except (SyntaxError, ValueError):
        defined = set()  # a reference in Python 2: name the first function the tests call
    for test in tests:
        try:
            calls = sorted((n.lineno, n.col_offset, n.func.id) for n in ast.walk(_parse(test))
                           if isinstance(n, ast.Call) and isinstance(n.func, ast.Name))  # fmt: skip
        except (SyntaxError, ValueError) as e:
            raise BadRecord(f"test does not parse: {test[:60]!r} ({e})") from e
        named = [name for *_, name in calls if name in defined or not defined]
        if named:
            return named[0]
    raise BadRecord("no entry point: no test calls a function the reference code defines")


def _mbpp(record: dict[str, Any]) -> PromptItem:
    sanitized = "test_imports" in record
    text = _string(record, "prompt" if sanitized else "text").strip()
    tests = _strings(record, "test_list")
    if not tests:
        raise BadRecord("no tests: 'test_list' is empty")
    code = _string(record, "code").replace("\r\n", "\n")
    setup = "\n".join(_strings(record, "test_imports")) if sanitized else _string(record, "test_setup_code")
    user = f"{text} {MBPP_INSTRUCTION}\n\n" + "\n".join(tests)
    meta = {"id": f"mbpp/{record.get('task_id')}", "tests": tests, "test_setup": setup.replace("\r\n", "\n"),
            "entry_point": entry_point(code, tests), "reference": code}  # fmt: skip
    return PromptItem([Message("user", user)], meta)


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the number after its last "####", commas removed."""
    head, mark, answer = solution.rpartition("####")
    answer = answer.strip().replace(",", "")
    if not mark or not _NUMBER.fullmatch(answer):
        raise BadRecord(f"no final answer: the answer must end with '#### NUMBER', got {solution[-40:]!r}")
    return answer


def _gsm8k(record: dict[str, Any]) -> PromptItem:
    question = _string(record, "question")
    return PromptItem(_user_turn([Message("user", question)]), {"answer": gsm8k_answer(_string(record, "answer"))})


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    """The meta keys a messages / prompt record carries; an answer may be a number."""
    meta: dict[str, Any] = {}
    for key in _TEXT_META:
        if record.get(key) is not None:
            value = record[key]
            if key in ("id", "answer") and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise BadRecord(f"wrong type: {key!r} must be a string, got {type(value).__name__}")
            meta[key] = value
    if "tests" in record:
        meta["tests"] = _strings(record, "tests")
    return meta


def _messages(record: dict[str, Any]) -> PromptItem:
    turns = record.get("messages")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                              and isinstance(t.get("content"), str) for t in turns):  # fmt: skip
        raise BadRecord("wrong type: 'messages' must be a list of {role, content} objects with string values")
    messages = [Message(t["role"], t["content"]) for t in turns]
    meta = _meta(record)
    if messages and messages[-1].role == "assistant":  # a reference reply: kept aside, never shown to the policy
        meta["reference"] = messages.pop().content
    return PromptItem(_user_turn(messages), meta)


def _prompt(record: dict[str, Any]) -> PromptItem:
    system = record.get("system") or ""
    if not isinstance(system, str):
        raise BadRecord(f"wrong type: 'system' must be a string, got {type(system).__name__}")
    messages = [Message("system", system)] if system else []
    return PromptItem(_user_turn([*messages, Message("user", _string(record, "prompt"))]), _meta(record))


def to_prompt(record: Any, fmt: str) -> PromptItem:
    """One raw record of format `fmt` as a prompt; raises BadRecord with the reason."""
    if not isinstance(record, dict):
        raise BadRecord(f"wrong type: record must be an object, got {type(record).__name__}")
    return {"mbpp": _mbpp, "gsm8k": _gsm8k, "messages": _messages, "prompt": _prompt}[fmt](record)


def read_prompts(path: str | Path, format: str | None = None,
                 limit: int | None = None) -> tuple[list[PromptItem], Skipped]:  # fmt: skip
    """Every valid prompt of `path` (at most `limit`) and the skipped records with where and why. The format is
    detected from the first record whose keys name one, unless `format` names it. meta["source"] is the record's
    location; meta["id"] defaults to it."""
    found, skipped, _ = read_formatted(Path(path), ("prompt", "prompt file"), FORMATS, format, detect_format, to_prompt,
                                       limit)
    for location, item in found:
        item.meta["source"] = location
        item.meta.setdefault("id", location)
    return [item for _, item in found], skipped


def docstring_prompts(pairs: Sequence[CodePair]) -> list[PromptItem]:
    """The sft stage's docstring -> body pairs as prompts: the user turn the sft stage trains on (signature and
    docstring); meta code_prompt is that text, which the reply's body completes, and meta reference the pair's own
    body (the `reference_similarity` reward reads it; the prompt never shows it)."""
    return [PromptItem(conversation(pair)[:1], {"id": pair.id, "source": pair.id, "code_prompt": pair.prompt,
                                                "reference": pair.body})
            for pair in pairs]  # fmt: skip
