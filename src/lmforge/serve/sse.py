"""Server-sent events in OpenAI's streaming format: each chunk is `data: <json>\\n\\n`, the stream ends with
`data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(chunk: dict[str, Any]) -> bytes:
    """One SSE event carrying `chunk` as compact JSON (a JSON string never holds a raw newline, so one line)."""
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """A `chat.completion.chunk` with one choice carrying `delta` (role and/or content)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def text_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
               logprobs: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """A `text_completion` chunk with one choice carrying the new `text`."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(chunk: dict[str, Any], usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage (`stream_options.include_usage`): no choices, the usage."""
    return {**chunk, "choices": [], "usage": usage}
