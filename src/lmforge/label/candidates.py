"""Candidates: the replies of two or more models to one prompt, not yet judged. They are what people label in the
labelling app and what an AI judge labels (lmforge.judge); the `pairs` stage writes them from a run's models.

A candidates file is JSON Lines, one item per line:
`{"id": "p12", "prompt": [{"role": "user", "content": "..."}], "responses": [{"model": "sft", "content": "..."},
{"model": "grpo", "content": "..."}], "reference": null, "meta": {}}`. `reference` is what a verifier checks a
reply against (an answer, tests); `meta["label"]` is a known answer ("a": the first response is better, "b", or
"tie"), used by attention checks and to measure a judge.

`read_candidates` also reads every preference format (lmforge.align.preferences): a pair's chosen and rejected
replies become responses "chosen" and "rejected", in that order, with `meta["label"] = "a"` (or "tie" for a kept
tie); PandaLM's records keep their own order (response1, response2) and their majority vote as the label, so a
judge sees the pairs exactly as the human annotators did.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.finetune.data import BadRecord, Conversation, Skipped, read_formatted, to_conversation
from lmforge.io import atomic_open

log = logging.getLogger(__name__)

LABELS = ("a", "b", "tie")
_PANDALM_LABELS = {0: "tie", 1: "a", 2: "b"}


@dataclass
class Response:
    model: str
    content: str


@dataclass
class Candidate:
    """Replies of several models to `prompt` (a conversation ending with a user message)."""

    id: str
    prompt: Conversation
    responses: list[Response]
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where it was read (file:line)

    @property
    def label(self) -> str | None:
        """The known answer for responses 0 and 1 ("a", "b" or "tie"), if the item has one."""
        return self.meta.get("label")


def pairs_of(item: Candidate) -> list[tuple[int, int]]:
    """Every unordered pair of response indices (i < j): the comparisons one item makes."""
    return list(itertools.combinations(range(len(item.responses)), 2))


def _messages(conversation: Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conversation]


def to_json(item: Candidate) -> dict[str, Any]:
    return {"id": item.id, "prompt": _messages(item.prompt),
            "responses": [{"model": r.model, "content": r.content} for r in item.responses],
            "reference": item.reference, "meta": item.meta}  # fmt: skip


def _candidate(record: dict[str, Any]) -> Candidate:
    if not isinstance(record.get("id"), (str, int)) or isinstance(record.get("id"), bool):
        raise BadRecord(f"missing key: 'id' must be a string or an integer, got {record.get('id')!r}")
    prompt = record.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise BadRecord("wrong type: 'prompt' must be a non-empty list of {role, content} messages")
    # Validated as a conversation the chat template can render, with the reply still to come.
    conversation = to_conversation({"messages": [*prompt, {"role": "assistant", "content": "-"}]}, "openai")[:-1]
    raw = record.get("responses")
    if not isinstance(raw, list) or len(raw) < 2:
        raise BadRecord("too few responses: 'responses' must list at least two {model, content} replies")
    responses = []
    for i, r in enumerate(raw):
        if not (isinstance(r, dict) and isinstance(r.get("model"), str) and isinstance(r.get("content"), str)):
            raise BadRecord(f"wrong type: responses[{i}] must be {{\"model\": str, \"content\": str}}")
        if not r["content"].strip():
            raise BadRecord(f"empty content: responses[{i}] (model {r['model']!r}) is empty")
        responses.append(Response(r["model"], r["content"]))
    meta = record.get("meta") or {}
    if not isinstance(meta, dict) or meta.get("label", "a") not in LABELS:
        raise BadRecord(f"wrong type: 'meta' must be an object whose label is one of {list(LABELS)}")
    reference = record.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise BadRecord(f"wrong type: 'reference' must be a string or null, got {type(reference).__name__}")
    return Candidate(str(record["id"]), conversation, responses, reference, meta)


def _from_pandalm(record: dict[str, Any], location: str) -> Candidate:
    from lmforge.align.preferences import majority

    base = {"instruction": record.get("instruction"), "input": record.get("input") or ""}
    prompt = to_conversation({**base, "output": "-"}, "alpaca")[:-1]
    replies = []
    for key in ("response1", "response2"):
        value = record.get(key)
        if not isinstance(value, str):
            raise BadRecord(f"wrong type: {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise BadRecord(f"empty content: {key!r} is empty or whitespace")
        replies.append(Response(key, value))
    votes = [record.get(f"annotator{i}") for i in (1, 2, 3)]
    label = _PANDALM_LABELS[majority(votes)]
    return Candidate(str(record.get("idx", location)), prompt, replies, None,
                     {"label": label, "votes": [str(v) for v in votes]})  # fmt: skip


def _from_preference(record: dict[str, Any], fmt: str, location: str) -> Candidate:
    from lmforge.align.preferences import PreferencePair, to_record

    if fmt == "pandalm":
        return _from_pandalm(record, location)
    pair = to_record(record, fmt, ties="keep")
    if not isinstance(pair, PreferencePair):
        raise BadRecord(f"not a pair: {fmt} records label one reply each; candidates need two replies to compare")
    label = "tie" if pair.tie else "a"
    return Candidate(pair.id or location, pair.prompt, [Response("chosen", pair.chosen),
                     Response("rejected", pair.rejected)], None, {"label": label})  # fmt: skip


def _detect(record: Any) -> str | None:
    from lmforge.align.preferences import detect_format

    if isinstance(record, dict) and "responses" in record and "prompt" in record:
        return "candidates"
    return detect_format(record)


def read_candidates(path: str | Path, limit: int | None = None) -> tuple[list[Candidate], Skipped]:
    """Every valid item of a candidates file or a preference file (at most `limit`) and the skipped records with
    where and why. Ids must be unique: a repeated id is skipped, since labels are joined back on it."""
    from lmforge.align.preferences import FORMATS

    def convert(raw: Any, fmt: str) -> Candidate:
        if not isinstance(raw, dict):
            raise BadRecord(f"wrong type: record must be an object, got {type(raw).__name__}")
        return _candidate(raw) if fmt == "candidates" else _from_preference(raw, fmt, "")

    found, skipped, _ = read_formatted(Path(path), ("candidate", "candidates file"), ("candidates", *FORMATS), None,
                                       _detect, convert, limit)  # fmt: skip
    items: list[Candidate] = []
    seen: set[str] = set()
    for location, item in found:
        item.source = location
        item.id = item.id or location
        if item.id in seen:
            skipped.add(location, f"duplicate id: {item.id!r} appears earlier in the file")
            continue
        seen.add(item.id)
        items.append(item)
    return items, skipped


def write_candidates(path: str | Path, items: Sequence[Candidate]) -> None:
    """Write `items` as a candidates file, atomically (a kill leaves the old file or the whole new one)."""
    with atomic_open(path) as f:
        for item in items:
            f.write(json.dumps(to_json(item), ensure_ascii=False) + "\n")

