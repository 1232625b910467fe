"""The bodies of generation responses: a whole completion or chat completion, or its SSE chunks (sse.py), with
usage and logprobs in OpenAI's format; and the bookkeeping of a request in flight (its engine handle, its
concurrency slot, the timing of its tokens)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from lmforge.infer.batching import Finished, TokenEvent
from lmforge.serve import sse
from lmforge.serve.metrics import Metrics
from lmforge.tokenizer import Tokenizer


class Slots:
    """The open generation and embedding requests, at most `max_concurrency`; the draining flag (set on SIGTERM)."""

    def __init__(self, max_concurrency: int) -> None:
        self.draining = False
        self.in_flight = 0
        self.max_concurrency = max_concurrency

    def acquire(self) -> bool:
        """Take a slot; False when all are taken."""
        if self.in_flight >= self.max_concurrency:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class Stream(StreamingResponse):
    """An SSE response that runs `on_close` however the response ends (a client that disconnects included, even
    before the first chunk), so the request is cancelled in the engine and its slot freed at once."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Flight:
    """One generation request in flight: its engine handle and concurrency slot, and the timing of its tokens."""

    def __init__(self, handle: Any, prompt_tokens: int, started: float, metrics: Metrics, slots: Slots) -> None:
        self.handle, self.prompt_tokens, self.started = handle, prompt_tokens, started
        self.metrics, self.slots = metrics, slots
        self.finished = self.closed = False
        self.tokens = 0

    async def events(self) -> AsyncIterator[TokenEvent | Finished]:
        """The request's events, timed for the metrics (time to first token, time between tokens)."""
        last = None
        async for ev in self.handle.aiter():
            now = time.perf_counter()
            if isinstance(ev, Finished):
                self.finished = True
                self.metrics.done(ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)
            else:
                self.tokens += 1
                (self.metrics.ttft if last is None else self.metrics.inter_token).observe(now - (last or self.started))
                last = now
            yield ev

    def ready(self) -> bool:
        """Whether the request's next event is already waiting."""
        return self.handle.ready()

    def close(self) -> None:
        """Free the slot (once); a request that has not finished (its client left, the server failed) is cancelled,
        so the engine does not keep generating for nobody."""
        if self.closed:
            return
        self.closed = True
        self.slots.release()
        if not self.finished:
            self.handle.cancel()
            self.metrics.done("cancelled", self.prompt_tokens, self.tokens)


class Choice:
    """The response bodies of one request: the whole response, or the SSE chunks of a stream. `cite`, for a RAG
    chat (rag.py): the reply's text -> its citations, sent in the body or with the stream's finish reason."""

    def __init__(self, rid: str, created: int, model: str, logprobs: Logprobs, chat: bool,
                 cite: Callable[[str], list[dict]] | None = None) -> None:  # fmt: skip
        self.rid, self.created, self.model, self.lp, self.chat, self.cite = rid, created, model, logprobs, chat, cite

    async def whole(self, events: AsyncIterator, close: Callable[[], None]) -> dict:
        """The whole response from the request's `events`; `close` runs however they end."""
        tokens: list[TokenEvent] = []
        try:
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    tokens.append(ev)
                else:
                    fin = ev
        finally:
            close()
        choice: dict[str, Any] = {"index": 0, "logprobs": self.lp.of(tokens), "finish_reason": fin.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": fin.text}
        else:
            choice["text"] = fin.text
        body = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(fin.prompt_tokens, fin.completion_tokens)}  # fmt: skip
        if self.cite is not None:
            body["citations"] = self.cite(fin.text)
        return body

    def chunk(self, text: str, reason: str | None = None, logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {"content": text} if text else {}
            return sse.chat_chunk(self.rid, self.created, self.model, delta, reason, logprobs)
        return sse.text_chunk(self.rid, self.created, self.model, text, reason, logprobs)

    async def stream(self, events: AsyncIterator, include_usage: bool,
                     ready: Callable[[], bool] = lambda: False) -> AsyncIterator[bytes]:  # fmt: skip
        """A first chunk with the role (chat), one per token that releases text, one with the finish reason, the
        usage chunk when asked, then [DONE]. Tokens whose successors are already waiting (`ready`: the engine
        made several in one step, or the client reads slower than the model writes) go out as one chunk of their
        joined text; tokens with logprobs always go one per chunk."""
        if self.chat:
            yield sse.event(sse.chat_chunk(self.rid, self.created, self.model, {"role": "assistant", "content": ""}))
        held = ""
        async for ev in events:
            if isinstance(ev, Finished):
                if held:
                    yield sse.event(self.chunk(held))
                last = self.chunk("", ev.finish_reason)
                yield sse.event(last | ({"citations": self.cite(ev.text)} if self.cite is not None else {}))
                if include_usage:
                    yield sse.event(sse.usage_chunk(last, usage(ev.prompt_tokens, ev.completion_tokens)))
            elif ev.logprob is not None:
                yield sse.event(self.chunk(ev.text, None, self.lp.of([ev])))
            elif ready():
                held += ev.text
            elif held or ev.text:
                yield sse.event(self.chunk(held + ev.text))
                held = ""
        yield sse.DONE


async def told(text: str) -> AsyncIterator[TokenEvent | Finished]:
    """The events of a reply the model did not write (a RAG refusal): its text, then "stop" after no tokens."""
    yield TokenEvent(-1, text)
    yield Finished("stop", 0, 0, text)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


class Logprobs:
    """The logprobs of a choice, in the format of its route: chat's `content` list or completions' parallel lists."""

    def __init__(self, tokenizer: Tokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat

    def of(self, events: Sequence[TokenEvent]) -> dict | None:
        if not events or events[0].logprob is None:
            return None
        tokens = [self.tokenizer.decode([ev.token_id], skip_special_tokens=False) for ev in events]
        if self.chat:
            return {"content": [{"token": t, "logprob": ev.logprob, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                                  for s, lp in ev.top_logprobs or []]}
                                for t, ev in zip(tokens, events)]}  # fmt: skip
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
        return {"tokens": tokens, "token_logprobs": [ev.logprob for ev in events],
                "top_logprobs": [dict(ev.top_logprobs) if ev.top_logprobs is not None else None for ev in events],
                "text_offset": offsets}  # fmt: skip
