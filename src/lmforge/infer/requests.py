"""A batching engine's requests: the handle a caller holds (events, blocking or async, and cancel) and the engine's
own state of each request (its sampling, stops, penalties, drafts and the text it has released).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmforge.infer.sampling import SamplingParams, StopText, pick, sampling_logits
from lmforge.infer.speculative import NgramIndex

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

__all__ = ["Event", "Finished", "RequestHandle", "TokenEvent"]


@dataclass
class TokenEvent:
    """One generated token: its id, the text it releases, and (when asked) its logprob and the top alternatives."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None


@dataclass
class Finished:
    """The last event of a request; `text` is the whole completion (the events' deltas joined)."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    text: str


Event = TokenEvent | Finished


class RequestHandle:
    """A submitted request: iterate it (blocking) or `async for ev in handle.aiter()` for its events."""

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self._events: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]] | None = None
        self.cancelled = threading.Event()
        self.finished = threading.Event()  # set once the Finished event is out

    def cancel(self) -> None:
        """Ask the engine to end this request; it finishes with "cancelled" at the next step and frees its slot."""
        self.cancelled.set()

    def _put(self, ev: Event) -> None:
        """Hand an event to the reader: its event loop's queue once `aiter` has started, else the blocking queue."""
        with self._lock:
            if self._async is not None:
                loop, aq = self._async
                try:
                    loop.call_soon_threadsafe(aq.put_nowait, ev)
                except RuntimeError:  # the reader's event loop is closed: nobody reads these events any more
                    pass
            else:
                self._events.put(ev)
        if isinstance(ev, Finished):
            self.finished.set()

    def ready(self) -> bool:
        """Whether an async reader has an event waiting (it may send what it holds together with it)."""
        return self._async is not None and not self._async[1].empty()

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self._events.get()
            yield ev
            if isinstance(ev, Finished):
                return

    async def aiter(self) -> AsyncIterator[Event]:
        """The events, delivered to the running event loop by the engine's thread (nothing blocks the loop and no
        thread waits for a reader that went away). Use either this or plain iteration, once."""
        aq: asyncio.Queue[Event] = asyncio.Queue()
        with self._lock:
            while not self._events.empty():
                aq.put_nowait(self._events.get_nowait())
            self._async = (asyncio.get_running_loop(), aq)
        while True:
            ev = await aq.get()
            yield ev
            if isinstance(ev, Finished):
                return


class _Request:
    """The engine's state of one request."""

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 room: int, vocab: int, device: torch.device) -> None:  # fmt: skip
        self.handle, self.prompt, self.params = handle, prompt, params
        self.max_tokens = min(params.max_tokens, room)
        self.stops = frozenset(params.stop_token_ids) | frozenset([] if params.ignore_eos else tokenizer.stop_ids)
        self.text = StopText(tokenizer, params.stop)
        self.tokenizer = tokenizer
        self.tokens: list[int] = []  # every sampled id
        self.released: list[str] = []
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, device=device)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
        self.last = -1  # the token to feed next step
        self.ngrams: NgramIndex | None = None  # set by an engine that drafts (plain greedy requests only)

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty and no logprobs: the token is the argmax of the model's logits."""
        p = self.params
        return p.temperature == 0 and not p.penalised and not p.logprobs

    def step(self, logits: torch.Tensor, token: int | None = None) -> Finished | None:
        """Sample one token from this request's logits [V] (or take `token`, a plain greedy request's argmax) and
        emit its event; the Finished when the request ends here."""
        x = logits
        if token is None:
            x = sampling_logits(logits, self.params, seen=self.seen, counts=self.counts)
            token = pick(x, self.params, self.generator)
        self.tokens.append(token)
        if self.ngrams is not None:
            self.ngrams.extend([token])
        stopped = token in self.stops
        delta = ""
        if not stopped:
            delta, stopped = self.text.push(token)
            if self.seen is not None:
                self.seen[token] = True
            if self.counts is not None:
                self.counts[token] += 1
        done = stopped or self.generated >= self.max_tokens
        if done:
            delta += self.text.flush()
        self._emit(TokenEvent(token, delta, *self._logprobs(x, token)))
        self.last = token
        if done:
            return self.finish("stop" if stopped else "length")
        return None

    def _logprobs(self, x: torch.Tensor, token: int) -> tuple[float | None, list[tuple[str, float]] | None]:
        if not self.params.logprobs:
            return None, None
        lp = torch.log_softmax(x, dim=-1)
        top = None
        if self.params.top_logprobs:
            values, ids = torch.topk(lp, self.params.top_logprobs)
            top = [(self.tokenizer.decode([i], skip_special_tokens=False), v)
                   for i, v in zip(ids.tolist(), values.tolist(), strict=True)]  # fmt: skip
        return float(lp[token]), top

    def _emit(self, ev: TokenEvent) -> None:
        self.released.append(ev.text)
        self.handle._put(ev)

    def finish(self, reason: str) -> Finished:
        done = Finished(reason, len(self.prompt), self.generated, "".join(self.released))
        self.handle._put(done)
        return done
