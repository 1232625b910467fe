"""How a stream cuts its chunks: tokens whose successors are already waiting go out together, tokens with logprobs
one by one, and the joined deltas are always the whole text."""

from __future__ import annotations

import asyncio
import json

from lmforge.infer.batching import Finished, TokenEvent
from lmforge.serve.responses import Choice, Logprobs
from lmforge.tokenizer import train_tokenizer


def chunks(events: list, waiting: list[bool], logprobs: bool = False) -> list[dict]:
    """The stream's JSON chunks when, after each event, `waiting` says whether the next one is already there."""
    tok = train_tokenizer(["abc def"] * 10, vocab_size=40)
    choice = Choice("chatcmpl-1", 0, "m", Logprobs(tok, chat=True), chat=True)
    state = {"i": 0}

    async def source():
        for i, ev in enumerate(events):
            state["i"] = i
            yield ev

    async def collect() -> list[bytes]:
        ready = lambda: waiting[state["i"]]  # noqa: E731
        return [part async for part in choice.stream(source(), include_usage=True, ready=ready)]

    parts = asyncio.run(collect())
    assert parts[-1] == b"data: [DONE]\n\n"
    return [json.loads(p[6:]) for p in parts[:-1]]


def contents(chunks_: list[dict]) -> list[str]:
    return [c["choices"][0]["delta"].get("content") for c in chunks_ if c["choices"] and
            c["choices"][0]["finish_reason"] is None][1:]  # fmt: skip


def test_waiting_tokens_are_sent_together():
    events = [TokenEvent(1, "a"), TokenEvent(2, "b"), TokenEvent(3, "c"), TokenEvent(4, "d"), TokenEvent(5, ""),
              Finished("length", 3, 5, "abcd")]  # fmt: skip
    # "b" and "c" arrive while their successors wait: "a", then "bcd"; the empty last delta waits for the finish.
    got = chunks(events, [False, True, True, False, True, False])
    assert contents(got) == ["a", "bcd"]
    assert got[-2]["choices"][0]["finish_reason"] == "length"
    assert got[-1]["usage"]["completion_tokens"] == 5
    # Held text is sent before the finish reason, never lost.
    held = chunks(events, [True] * 6)
    assert contents(held) == ["abcd"]


def test_tokens_with_logprobs_go_one_per_chunk():
    events = [TokenEvent(1, "a", -0.5, []), TokenEvent(2, "b", -0.25, []), Finished("stop", 3, 2, "ab")]
    got = chunks(events, [True, True, False])
    assert contents(got) == ["a", "b"]
    assert [c["choices"][0]["logprobs"]["content"][0]["logprob"] for c in got[1:3]] == [-0.5, -0.25]
