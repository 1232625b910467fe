"""Instruction and chat records -> validated conversations (`list[Message]`).

Four record formats are read, auto-detected per file from the first record whose keys name one of them:
- Alpaca `{instruction, input?, output, system?}`: user = instruction (+ "\\n\\n" + input when input is non-empty).
- ShareGPT `{conversations: [{from: human|gpt|system|user|assistant, value}]}`.
- OpenAI-style `{messages: [{role, content}]}`.
- prompt/response `{prompt, response}` (e.g. dolly_hhrlhf).

Records in any other shape (GSM8K's `{question, answer}`) are read through a `FieldMap` naming the prompt, the
response and optionally the system field (`--prompt-field question --response-field answer`). A file in which no
record names a format, or whose first record lacks a mapped field, is one error that lists the keys it has and the
keys each format needs, instead of one skip per record.

Files are `.json` (one array of records) or `.jsonl` (one record a line). A bad record is never fatal and never
silently dropped: it is skipped and counted in `Skipped` with its location (`file:line` for JSONL, `file[index]`
for JSON arrays) and a reason. Content is kept exactly as written (no stripping): whitespace can matter to the
answer, and the template must reproduce the text byte for byte.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
# The keys each format reads (`?`: optional), for the error that lists them.
FORMAT_KEYS: dict[str, str] = {
    "alpaca": "{instruction, output, input?, system?}",
    "sharegpt": "{conversations: [{from, value}]}",
    "openai": "{messages: [{role, content}]}",
    "prompt_response": "{prompt, response}",
}
FORMATS: tuple[str, ...] = tuple(FORMAT_KEYS)
# Likely prompt and response keys of other data, in order of preference: suggested in the unknown-format error.
PROMPT_KEYS = ("question", "query", "input", "prompt", "instruction", "text", "problem", "context")
RESPONSE_KEYS = ("answer", "response", "output", "completion", "solution", "target")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MAX_EXAMPLES = 5


@dataclass
class Message:
    role: Role
    content: str


Conversation = list[Message]


@dataclass(frozen=True)
class FieldMap:
    """Where the turns of records in no known format are: user = record[prompt], assistant = record[response],
    and, when `system` is set and the record's value is non-empty, a system message first."""

    prompt: str
    response: str
    system: str | None = None

    def describe(self) -> str:
        return f"fields {self.prompt!r} -> {self.response!r}" + (f" (system {self.system!r})" if self.system else "")


class BadRecord(ValueError):
    """A record that cannot become a valid conversation; its message is the skip reason."""


@dataclass
class Skipped:
    """Skipped records: the total, the count per reason, and the first few as 'location: reason'."""

    count: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, location: str, reason: str) -> None:
        self.count += 1
        # The reason's head (before any ':') groups records that failed the same way.
        key = reason.split(":", 1)[0]
        self.by_reason[key] = self.by_reason.get(key, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{location}: {reason}")


def pick_field(keys: Sequence[Any], candidates: Sequence[str]) -> str | None:
    """The first candidate among `keys`, compared case-insensitively; the key is returned as the file spells it."""
    lower: dict[str, Any] = {}
    for key in keys:
        lower.setdefault(str(key).lower(), key)
    return next((lower[c] for c in candidates if c in lower), None)


def require_fields(location: str, record: dict[str, Any], wanted: dict[str, str | None]) -> None:
    """Raise ValueError, once for the file, when the record lacks a field the user named; `wanted` maps the option
    that named it (e.g. '--label-field') to the field."""
    for option, name in wanted.items():
        if name is not None and name not in record:
            raise ValueError(f"{location}: no field {name!r}; fields: {', '.join(map(str, record))} (set by {option})")


def unknown_format(path: Path, read: int, keys: list[Any]) -> str:
    """The error for a file none of whose records names a format: its keys, each format's, and the mapping flags."""
    prompt, response = pick_field(keys, PROMPT_KEYS), pick_field(keys, RESPONSE_KEYS)
    flags = (f"--prompt-field {prompt} --response-field {response}" if prompt and response and prompt != response
             else "--prompt-field KEY --response-field KEY")  # fmt: skip
    formats = "; ".join(f"{name} {keys_}" for name, keys_ in FORMAT_KEYS.items())
    return (f"{path}: none of the {read} records read is in a known SFT format (the first has keys "
            f"{[str(k) for k in keys]}). The formats and their keys: {formats}. Map other fields with {flags} "
            "(recipe: sft.prompt_field, sft.response_field, optionally sft.system_field)")


def detect_format(record: Any) -> str | None:
    """The format a record's keys name, or None when they name none."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "response" in record:
        return "prompt_response"
    return None


def _text(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if key not in record:
        raise BadRecord(f"missing key: {key!r}")
    if not isinstance(value, str):
        raise BadRecord(f"wrong type: {key!r} must be a string, got {type(value).__name__}")
    return value


def _turns(record: dict[str, Any], key: str, role_key: str, content_key: str) -> list[tuple[Any, Any]]:
    turns = record.get(key)
    if not isinstance(turns, list):
        raise BadRecord(f"wrong type: {key!r} must be a list, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"wrong type: {key}[{i}] must be an object, got {type(turn).__name__}")
        for k in (role_key, content_key):
            if not isinstance(turn.get(k), str):
                raise BadRecord(f"wrong type: {key}[{i}].{k} must be a string, got {type(turn.get(k)).__name__}")
        out.append((turn[role_key], turn[content_key]))
    return out


def to_conversation(record: Any, fmt: str, fields: FieldMap | None = None) -> Conversation:
    """The validated conversation of one record in format `fmt`, or read through `fields` when given; raises
    BadRecord with the reason."""
    if not isinstance(record, dict):
        raise BadRecord(f"wrong type: record must be an object, got {type(record).__name__}")
    if fields is None and detect_format(record) != fmt:
        raise BadRecord(f"wrong format: keys {sorted(record)[:6]} do not match the file's format {fmt!r}")
    messages: Conversation = []
    if fields is not None:
        system = _text(record, fields.system, required=False) if fields.system else ""
        messages = [Message("system", system)] if system else []
        messages += [Message("user", _text(record, fields.prompt)),
                     Message("assistant", _text(record, fields.response))]  # fmt: skip
    elif fmt == "alpaca":
        system = _text(record, "system", required=False)
        user, extra = _text(record, "instruction"), _text(record, "input", required=False)
        # An empty system / input is the format's way of saying "none".
        if system:
            messages.append(Message("system", system))
        messages += [Message("user", f"{user}\n\n{extra}" if extra else user),
                     Message("assistant", _text(record, "output"))]  # fmt: skip
    elif fmt == "prompt_response":
        messages = [Message("user", _text(record, "prompt")), Message("assistant", _text(record, "response"))]
    else:
        sharegpt = fmt == "sharegpt"
        key, role_key, content_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
        for i, (role, content) in enumerate(_turns(record, key, role_key, content_key)):
            mapped = _SHAREGPT_ROLES.get(role) if sharegpt else (role if role in ROLES else None)
            if mapped is None:
                raise BadRecord(f"unknown role: {key}[{i}].{role_key} = {role!r}")
            messages.append(Message(mapped, content))  # type: ignore[arg-type]
    validate(messages)
    return messages


def validate(messages: Conversation) -> None:
    """Raise BadRecord unless the conversation is one the chat template can train on."""
    if not messages:
        raise BadRecord("empty conversation: no messages")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise BadRecord(f"unknown role: message {i} has role {m.role!r}")
        if not isinstance(m.content, str):
            raise BadRecord(f"wrong type: message {i} content must be a string, got {type(m.content).__name__}")
        if not m.content.strip():
            raise BadRecord(f"empty content: message {i} ({m.role}) is empty or whitespace")
        if m.role == "system" and i != 0:
            raise BadRecord(f"system not first: message {i} is a system message")
        if i > 0 and m.role == messages[i - 1].role:
            raise BadRecord(f"consecutive same role: messages {i - 1} and {i} are both {m.role!r}")
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord("no assistant turn: nothing to train on")


def iter_records(path: Path, skipped: Skipped) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of a .json array or .jsonl (.jsonl.gz) file; unparsable JSONL lines are
    skipped."""
    gzipped = path.suffixes[-2:] == [".jsonl", ".gz"]
    if path.suffix == ".jsonl" or gzipped:
        with (gzip.open(path, "rt", encoding="utf-8") if gzipped else path.open(encoding="utf-8")) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue  # a blank line holds no record
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    skipped.add(f"{path}:{n}", f"invalid JSON: {e.msg} at column {e.colno}")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json file must hold one array") from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json file must hold an array of records, got {type(data).__name__}")
        for i, record in enumerate(data):
            yield f"{path}[{i}]", record
    else:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; expected .json, .jsonl or .jsonl.gz")


def read_formatted(path: Path, what: tuple[str, str], formats: Sequence[str], format: str | None,
                   detect: Callable[[Any], str | None], convert: Callable[[Any, str], Any],
                   limit: int | None = None) -> tuple[list[tuple[str, Any]], Skipped, str | None]:  # fmt: skip
    """(location, item) for the records of `path` that `convert(record, fmt)` accepts (at most `limit`), the skipped
    ones with where and why, and the format: `format`, else detected by `detect(record)` from the first record whose
    keys name one. `what` names the records and the file in errors (("prompt", "prompt file"))."""
    if format is not None and format not in formats:
        raise ValueError(f"unknown {what[0]} format {format!r}; expected one of {list(formats)}")
    if not path.is_file():
        raise FileNotFoundError(f"{what[1]} {path} does not exist")
    skipped, items, fmt = Skipped(), [], format
    for location, raw in iter_records(path, skipped):
        if limit is not None and len(items) >= limit:
            break
        fmt = fmt or detect(raw)
        try:
            if fmt is None:
                raise BadRecord(f"unknown format: keys {sorted(raw)[:6] if isinstance(raw, dict) else raw!r} name "
                                f"none of {list(formats)}")  # fmt: skip
            items.append((location, convert(raw, fmt)))
        except BadRecord as e:
            skipped.add(location, str(e))
    log.info("%s: format %s; %d records kept, %d skipped %s", path, fmt, len(items), skipped.count,
             skipped.by_reason)  # fmt: skip
    return items, skipped, fmt


def read_conversations(
    path: str | Path, limit: int | None = None, fields: FieldMap | None = None
) -> tuple[list[Conversation], Skipped]:
    """Every valid conversation in `path` (at most `limit`), and the records skipped with where and why; with
    `fields`, records are read through that mapping instead of a detected format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file {path} does not exist")
    skipped = Skipped()
    conversations: list[Conversation] = []
    fmt: str | None = "fields" if fields is not None else None
    first_keys: list[Any] | None = None
    for location, record in iter_records(path, skipped):
        # While no record has named a format, every record read counts against the limit.
        if limit is not None and (len(conversations) >= limit or (fmt is None and skipped.count >= limit)):
            break
        if first_keys is None and isinstance(record, dict):
            first_keys = list(record)
            if fields is not None:
                require_fields(location, record, {"--prompt-field / sft.prompt_field": fields.prompt,
                                                  "--response-field / sft.response_field": fields.response,
                                                  "--system-field / sft.system_field": fields.system})  # fmt: skip
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                skipped.add(location, "unknown format: the record's keys name no format")
                continue
        try:
            conversations.append(to_conversation(record, fmt, fields))
        except BadRecord as e:
            skipped.add(location, str(e))
    if fmt is None and first_keys is not None:
        raise ValueError(unknown_format(path, skipped.count, first_keys))
    log.info("%s: %s; %d records read, %d kept, %d skipped", path,
             fields.describe() if fields is not None else f"format {fmt}", len(conversations) + skipped.count,
             len(conversations), skipped.count)  # fmt: skip
    if skipped.count:
        log.warning("%s: skipped %d bad records %s, e.g. %s", path, skipped.count, skipped.by_reason,
                    "; ".join(skipped.examples[:3]))  # fmt: skip
    return conversations, skipped
