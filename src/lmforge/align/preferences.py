"""Preference data: pairs of replies to one prompt (chosen over rejected), unpaired labelled replies (KTO), the
readers of the common file formats, and the rendering of a pair through the model's chat template.

Formats, auto-detected per file from the first record's keys (or named with `format=`):
- `hh_rlhf`: `{chosen, rejected}`, each a whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript. The text up to
  the last "\\n\\nAssistant:" is the prompt and must be the same in both; what follows is the reply.
- `trl`: `{prompt, chosen, rejected}`, plain strings or conversational (`prompt` a list of {role, content},
  `chosen` / `rejected` a list holding one assistant message), with an optional numeric `margin` (how strongly
  chosen is preferred: a reward model trained with `margin="from data"` asks its scores to differ by at least it).
- `llamafactory_dpo`: `{conversations: [{from, value}], chosen: {from, value}, rejected: {from, value}}`.
- `llamafactory_kto`: `{messages: [{role, content}], label: bool}`, the last message the labelled reply.
- `pandalm`: `{instruction, input, response1, response2, annotator1..3}`, votes 0 (tie), 1 or 2: the majority
  vote picks the chosen response; a tie is dropped (counted) or, with `ties="keep"`, kept with `tie=True`.
- `lmforge`: what lmforge's labelling app and judges write (`preference_record`): TRL's conversational record
  plus `tie`, `both_bad` and `provenance` (who decided, every vote, the models). A tie or "both bad" is dropped
  (counted) or kept with `tie=True`, as PandaLM's ties are.

Files are .json arrays, .jsonl or .jsonl.gz (lmforge.finetune.data.iter_records). A bad record is skipped and
counted in `Skipped` with its location (`file:line`, or `file[index]` in a JSON array) and a reason; it never
stops the read. Messages are validated as SFT conversations are (lmforge.finetune.data.validate).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.finetune.data import BadRecord, Conversation, Message, Skipped, read_formatted, to_conversation
from lmforge.finetune.template import render
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer

log = logging.getLogger(__name__)

FORMATS = ("hh_rlhf", "trl", "llamafactory_dpo", "llamafactory_kto", "pandalm", "lmforge")
CHOICES = ("a", "b", "tie", "both_bad")  # a vote on replies a and b of one prompt
Ties = Literal["drop", "keep"]
_HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_VOTES = {"0": 0, "1": 1, "2": 2}


@dataclass
class PreferencePair:
    """`chosen` is preferred over `rejected` as the assistant's next message after `prompt` (which ends with a
    user message). `tie=True` (PandaLM with ties="keep"): the annotators preferred neither, and chosen / rejected
    are just the first and second response; preference losses must not train on such a pair as a preference.
    `margin`: the record's own preference strength, where its format has one (TRL's `margin` column)."""

    prompt: Conversation
    chosen: str
    rejected: str
    id: str | None = None
    source: str = ""
    tie: bool = False
    margin: float | None = None


@dataclass
class LabelledReply:
    """One assistant reply to `prompt`, labelled desirable or not (KTO's unpaired data)."""

    prompt: Conversation
    reply: str
    desirable: bool
    id: str | None = None
    source: str = ""


Record = PreferencePair | LabelledReply


def detect_format(record: Any) -> str | None:
    """The preference format a record's keys name, or None."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record and "chosen" in record:
        return "llamafactory_dpo"
    if "messages" in record and "label" in record:
        return "llamafactory_kto"
    if "response1" in record and "annotator1" in record:
        return "pandalm"
    if "provenance" in record and "chosen" in record:
        return "lmforge"
    if "chosen" in record and "rejected" in record:
        return "trl" if "prompt" in record else "hh_rlhf"
    return None


def _split_reply(conversation: Conversation) -> tuple[Conversation, str]:
    if conversation[-1].role != "assistant":
        raise BadRecord(f"no reply: the last message is a {conversation[-1].role} message, not the assistant's")
    return conversation[:-1], conversation[-1].content


def _pair(prompt_c: Conversation, chosen: str, prompt_r: Conversation, rejected: str, **kw: Any) -> PreferencePair:
    if prompt_c != prompt_r:
        raise BadRecord("different prompts: chosen and rejected answer different conversations")
    if chosen == rejected:
        raise BadRecord("chosen equals rejected: the pair prefers nothing")
    return PreferencePair(prompt_c, chosen, rejected, **kw)


def _hh_turns(transcript: str) -> Conversation:
    """The messages of a "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript (one space after the colon is format)."""
    parts = _HH_TURN.split(transcript)
    if parts[0]:
        raise BadRecord(f"not a transcript: text before the first turn: {parts[0][:40]!r}")
    return [Message(_HH_ROLES[role], text[1:] if text.startswith(" ") else text)  # type: ignore[arg-type]
            for role, text in zip(parts[1::2], parts[2::2])]  # fmt: skip


def _hh_rlhf(record: dict[str, Any]) -> PreferencePair:
    chosen, rejected = (_string(record, k) for k in ("chosen", "rejected"))
    cut = chosen.rfind(_HH_ASSISTANT)
    if cut < 0 or rejected.rfind(_HH_ASSISTANT) != cut or rejected[:cut] != chosen[:cut]:
        raise BadRecord("different prompts: chosen and rejected do not share the text up to the last Assistant turn")
    conversations = [_hh_turns(side) for side in (chosen, rejected)]
    for conversation in conversations:
        to_conversation({"messages": [vars(m) for m in conversation]}, "openai")  # validates the turns
    (prompt_c, reply_c), (prompt_r, reply_r) = (_split_reply(c) for c in conversations)
    return _pair(prompt_c, reply_c, prompt_r, reply_r)


def _trl(record: dict[str, Any]) -> PreferencePair:
    prompt = record.get("prompt")
    sides = []
    for key in ("chosen", "rejected"):
        if isinstance(prompt, str):
            sides.append(_split_reply(to_conversation({"prompt": prompt, "response": _string(record, key)},
                                                      "prompt_response")))  # fmt: skip
            continue
        reply = record.get(key)
        if not (isinstance(prompt, list) and isinstance(reply, list) and len(reply) == 1):
            raise BadRecord(f"wrong type: prompt must be a string or a message list, and {key!r} a string or a list "
                            "of one message")  # fmt: skip
        sides.append(_split_reply(to_conversation({"messages": [*prompt, *reply]}, "openai")))
    (prompt_c, chosen), (prompt_r, rejected) = sides
    return _pair(prompt_c, chosen, prompt_r, rejected, id=_id(record, "id"), margin=_margin(record))


def _margin(record: dict[str, Any]) -> float | None:
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise BadRecord(f"wrong type: 'margin' must be a number, got {value!r}")
    return float(value)


def _llamafactory_dpo(record: dict[str, Any]) -> PreferencePair:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise BadRecord(f"wrong type: 'conversations' must be a list, got {type(turns).__name__}")
    sides = [_split_reply(to_conversation({"conversations": [*turns, record.get(key)]}, "sharegpt"))
             for key in ("chosen", "rejected")]  # fmt: skip
    (prompt_c, chosen), (prompt_r, rejected) = sides
    return _pair(prompt_c, chosen, prompt_r, rejected)


def _llamafactory_kto(record: dict[str, Any]) -> LabelledReply:
    label = record.get("label")
    if not isinstance(label, bool):
        raise BadRecord(f"wrong type: 'label' must be true or false, got {label!r}")
    prompt, reply = _split_reply(to_conversation(record, "openai"))
    if not prompt:
        raise BadRecord("no prompt: the record holds only the reply")
    return LabelledReply(prompt, reply, label)


def majority(votes: list[Any]) -> int:
    """The vote (0 tie, 1, 2) most annotators gave; BadRecord for an invalid vote or no majority."""
    parsed = []
    for i, vote in enumerate(votes, 1):
        if str(vote) not in _VOTES:
            raise BadRecord(f"bad vote: annotator{i} = {vote!r}, expected 0 (tie), 1 or 2")
        parsed.append(_VOTES[str(vote)])
    (top, n), *rest = Counter(parsed).most_common()
    if rest and rest[0][1] == n:
        raise BadRecord(f"no majority: votes {parsed}")
    return top


def _pandalm(record: dict[str, Any], ties: Ties) -> PreferencePair:
    votes = [record.get(f"annotator{i}") for i in (1, 2, 3)]
    winner = majority(votes)
    if winner == 0 and ties == "drop":
        raise BadRecord(f"tie: the majority of votes {votes} prefers neither response (keep with ties='keep')")
    base = {"instruction": _string(record, "instruction"), "input": record.get("input") or ""}
    sides = [_split_reply(to_conversation({**base, "output": _string(record, key)}, "alpaca"))
             for key in ("response1", "response2")]  # fmt: skip
    if winner == 2:
        sides.reverse()
    (prompt_c, chosen), (prompt_r, rejected) = sides
    return _pair(prompt_c, chosen, prompt_r, rejected, id=_id(record, "idx"), tie=winner == 0)


def _lmforge(record: dict[str, Any], ties: Ties) -> PreferencePair:
    tie = record.get("tie", False)
    both_bad = record.get("both_bad", False)
    if not isinstance(tie, bool) or not isinstance(both_bad, bool):
        raise BadRecord(f"wrong type: 'tie' and 'both_bad' must be true or false, got {tie!r} and {both_bad!r}")
    if not isinstance(record.get("provenance"), dict):
        raise BadRecord("wrong type: 'provenance' must be an object (who decided, the votes, the models)")
    undecided = tie or both_bad
    if undecided and ties == "drop":
        kind = "both bad" if both_bad else "tie"
        raise BadRecord(f"{kind}: the labels prefer neither reply (keep with ties='keep')")
    pair = _trl(record)
    pair.tie = undecided
    return pair


def preference_record(prompt: Conversation, a: str, b: str, choice: str, provenance: dict[str, Any],
                      id: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One `lmforge`-format record: replies `a` and `b` to `prompt` and the decision `choice` ("a", "b", "tie" or
    "both_bad"). On a tie or both bad, chosen / rejected are a / b in that order and `tie` / `both_bad` say so."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {list(CHOICES)}, got {choice!r}")
    if not prompt or prompt[-1].role != "user":
        raise ValueError("the prompt must be a conversation ending with a user message")
    chosen, rejected = (b, a) if choice == "b" else (a, b)
    return {
        "id": id,
        "prompt": [{"role": m.role, "content": m.content} for m in prompt],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "tie": choice == "tie",
        "both_bad": choice == "both_bad",
        "provenance": provenance,
    }


def _string(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if key not in record:
        raise BadRecord(f"missing key: {key!r}")
    if not isinstance(value, str):
        raise BadRecord(f"wrong type: {key!r} must be a string, got {type(value).__name__}")
    return value


def _id(record: dict[str, Any], key: str) -> str | None:
    return None if record.get(key) is None else str(record[key])


def to_record(record: Any, fmt: str, ties: Ties = "drop") -> Record:
    """One raw record of format `fmt` as a pair (or a labelled reply); raises BadRecord with the reason."""
    if not isinstance(record, dict):
        raise BadRecord(f"wrong type: record must be an object, got {type(record).__name__}")
    if fmt == "pandalm":
        return _pandalm(record, ties)
    if fmt == "lmforge":
        return _lmforge(record, ties)
    return {"hh_rlhf": _hh_rlhf, "trl": _trl, "llamafactory_dpo": _llamafactory_dpo,
            "llamafactory_kto": _llamafactory_kto}[fmt](record)  # fmt: skip


def read_preferences(path: str | Path, format: str | None = None, ties: Ties = "drop",
                     limit: int | None = None) -> tuple[list[Record], Skipped]:  # fmt: skip
    """Every valid record of `path` (at most `limit`) and the skipped ones with where and why. The format is
    detected from the first record whose keys name one, unless `format` names it."""
    if ties not in ("drop", "keep"):
        raise ValueError(f"ties must be 'drop' or 'keep', got {ties!r}")
    found, skipped, _ = read_formatted(Path(path), ("preference", "preference data file"), FORMATS, format,
                                       detect_format, lambda raw, fmt: to_record(raw, fmt, ties), limit)  # fmt: skip
    for location, record in found:
        record.source = location
    return [record for _, record in found], skipped


@dataclass
class RenderedPair:
    """Ids and labels (aligned with ids, -100 where no loss: see lmforge.finetune.template) of prompt + chosen and
    prompt + rejected. Both start with the same `prompt_len` prompt ids; only reply tokens are targets."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt_len: int
    truncated: bool


def _render_reply(tok: Tokenizer, prompt: Conversation, reply: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, reply ids, reply labels): the conversation's ids split at its first target."""
    ids, labels = render(tok, [*prompt, Message("assistant", reply)], "last")
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None:
        raise BadRecord("empty reply: the reply renders to no target token")
    return ids[:start], ids[start:], labels[start:]


def render_pair(tok: Tokenizer, pair: PreferencePair, max_len: int,
                max_prompt_len: int | None = None) -> RenderedPair:  # fmt: skip
    """Render both sides with the tokenizer's chat template, loss on the reply (and its end of turn) only.

    Both sides must start with the same prompt ids (BadRecord if the template tokenizes the prompt differently).
    With `max_prompt_len`, a longer prompt keeps its last `max_prompt_len` ids; a prompt that leaves no room for a
    reply within `max_len` is a BadRecord; a reply longer than the room left keeps its head.
    """
    prompt, chosen, chosen_labels = _render_reply(tok, pair.prompt, pair.chosen)
    prompt_r, rejected, rejected_labels = _render_reply(tok, pair.prompt, pair.rejected)
    if prompt != prompt_r:
        raise BadRecord("prompt ids differ: the template tokenizes the prompt differently before the two replies")
    cut_prompt = max_prompt_len is not None and len(prompt) > max_prompt_len
    if cut_prompt:
        prompt = prompt[-max_prompt_len:]  # type: ignore[index]  # the tail: the turn the reply answers
    room = max_len - len(prompt)
    if room < 1:
        raise BadRecord(f"prompt too long: {len(prompt)} prompt tokens leave no room for a reply in max_len {max_len}")
    masked = [IGNORE_INDEX] * len(prompt)
    return RenderedPair(prompt + chosen[:room], masked + chosen_labels[:room], prompt + rejected[:room],
                        masked + rejected_labels[:room], len(prompt),
                        cut_prompt or max(len(chosen), len(rejected)) > room)  # fmt: skip


def render_pairs(tok: Tokenizer, pairs: list[PreferencePair], max_len: int, skipped: Skipped,
                 max_prompt_len: int | None = None) -> list[RenderedPair]:  # fmt: skip
    """`render_pair` over `pairs`; a pair that cannot be rendered is counted in `skipped` at its source."""
    out = []
    for pair in pairs:
        try:
            out.append(render_pair(tok, pair, max_len, max_prompt_len))
        except BadRecord as e:
            skipped.add(pair.source, str(e))
    return out
