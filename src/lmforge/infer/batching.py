"""The continuous-batching engine the server runs: many requests decoded together, joining and leaving token by token.

A background thread runs the loop. Each step it (1) drops cancelled requests, (2) admits waiting requests while a
slot is free, running each one's prompt (prefill) into its own rows of the KV cache, and (3) runs one decode
forward for every request that was already running, all rows at once, each row at its own position (see
`lmforge.model.kv_cache.SlotKVCache`). Each request then samples its next token with its own parameters and
generator (`lmforge.infer.sampling`), so a seeded request gives the same tokens whatever shares its batch, and
greedy output equals `lmforge.infer.engine.generate` on the same prompt. With `prefix_cache` (the default), a prompt
that starts like a sequence that already left the engine prefills only the rest (`lmforge.infer.prefix_cache`).

Events: every sampled token gives one `TokenEvent` (its text delta, UTF-8 safe and never part of a stop string;
the token that ends a request, a stop token included, gives one too, with the text held back until then), then one
`Finished`. The deltas join to `Finished.text` and `completion_tokens` counts the events. A request ends with
"stop" at a stop token (`stop_token_ids` and the tokenizer's `stop_ids`) or a stop string (the text is cut before
it), "length" at max_tokens or the end of the context, "cancelled" after `RequestHandle.cancel()`.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING

import torch

from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.requests import Finished, RequestHandle, TokenEvent, _Request
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import NgramIndex, accepted
from lmforge.infer.static_decode import StaticDecoder, unsupported
from lmforge.model.kv_cache import SlotKVCache

if TYPE_CHECKING:
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["BatchEngine", "Finished", "RequestHandle", "SamplingParams", "TokenEvent"]


class BatchEngine:
    """Continuous batching over one model: `submit` requests from any thread, a background thread decodes them.

    `max_batch` requests run at once (one KV cache slot each); more wait in order. `max_seq_len` (default and at
    most the model's context) bounds prompt plus completion: a longer prompt is refused, a completion is cut there
    ("length"). A failed step ends its running requests with "error" (logged) and the engine goes on.
    `compile` runs the decode step as compiled graphs of fixed shapes (`lmforge.infer.static_decode`), compiled
    by `start` (or on first use); a model or machine that cannot compile keeps the eager step, with a warning.
    `draft` > 0: while one plain greedy request decodes alone, each step also verifies up to `draft` tokens guessed
    from its own text (`lmforge.infer.speculative`); its output is unchanged, its speed depends on how the text
    repeats. Under concurrency the batch already shares each step's weight reads, so no drafts are made.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 32,
                 max_seq_len: int | None = None, prefix_cache: bool = True,
                 device: torch.device | str | None = None, compile: bool = False,
                 draft: int = 0) -> None:  # fmt: skip
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if draft < 0:
            raise ValueError(f"draft={draft} must be >= 0 (0: no speculative decoding)")
        self.draft = draft
        if device is not None:
            model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        limit = model.args.max_seq_len
        self.max_seq_len = min(max_seq_len or limit, limit)
        self.max_batch = max_batch
        self.cache = SlotKVCache.for_model(model, max_batch, self.max_seq_len)
        # Room for four full contexts of finished sequences (see lmforge.infer.prefix_cache).
        self.prefix = PrefixCache(4 * self.max_seq_len) if prefix_cache else None
        self.decoder: StaticDecoder | None = None
        if compile:
            reason = unsupported(model)
            if reason is None:
                self.decoder = StaticDecoder(model, self.cache, max_batch, draft)
            else:
                log.warning("decoding eagerly, not compiled: %s", reason)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # _running[i] lives in cache slot i
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._ids = itertools.count(1)
        self._counts = {"requests_finished": 0, "prompt_tokens": 0, "prefix_tokens_reused": 0, "tokens_generated": 0,
                        "steps": 0, "draft_tokens": 0, "draft_tokens_accepted": 0}  # fmt: skip

    # -- the public side, called from any thread

    def start(self) -> None:
        """Start the background loop (once)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        if self.decoder is not None and not self._running:
            self._warmup()
        self._thread = threading.Thread(target=self._loop, name="lmforge-batch-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Stop the loop: with `drain` after every submitted request has finished, else ending them "cancelled"."""
        with self._cv:
            self._stopping, self._drain = True, drain
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:  # never started: nothing will run what is queued
            self._cancel_all()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; ValueError for invalid params, an empty prompt, unknown ids or a prompt too long."""
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty; start it with the document-start token")
        vocab = self.model.args.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab} ids")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens and the engine's context is {self.max_seq_len} "
                             "tokens, leaving no room for a completion: shorten the prompt")  # fmt: skip
        handle = RequestHandle(next(self._ids))
        req = _Request(handle, prompt, params, self.tokenizer, self.max_seq_len - len(prompt), vocab, self.device)
        if self.draft and req.plain_greedy:
            req.ngrams = NgramIndex(prompt)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is stopping and takes no new requests")
            self._waiting.append(req)
            self._cv.notify_all()
        return handle

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Finished:
        """Run one request to its end (in this thread when the engine is not started) and return its Finished."""
        handle = self.submit(prompt_ids, params)
        if self._thread is None:
            while not handle.finished.is_set():
                self._step()
        *_, done = iter(handle)
        assert isinstance(done, Finished)
        return done

    @property
    def stats(self) -> dict[str, int]:
        """Counters for /metrics: running and waiting requests, slots, finished requests, tokens, steps."""
        return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.max_batch,
                **self._counts}  # fmt: skip

    def _warmup(self) -> None:
        assert self.decoder is not None
        try:
            self.decoder.warmup()
        except Exception as e:  # no C++ compiler, an operator inductor cannot lower...: serve eagerly instead
            log.warning("compiling the decode step failed, decoding eagerly: %s", e)
            self.decoder = None

    # -- the loop, in the engine's thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping and (not self._drain or not (self._waiting or self._running)):
                    break
            try:
                self._step()
            except Exception:  # a failed step must not hang every client: end their requests, keep serving
                log.exception("batch engine step failed; ending the %d running requests", len(self._running))
                for req in list(self._running):
                    self._leave(req, "error")
        self._cancel_all()

    def _cancel_all(self) -> None:
        """End every running and waiting request with "cancelled" (the engine stops without draining)."""
        with self._cv:
            left, self._waiting = [*self._running, *self._waiting], deque()
        self._running = []
        for req in left:
            req.finish("cancelled")

    @torch.inference_mode()
    def _step(self) -> None:
        """Drop cancelled requests, decode one token for every running request, then prefill newly admitted ones."""
        with self._cv:
            for req in [r for r in self._waiting if r.handle.cancelled.is_set()]:
                self._waiting.remove(req)
                req.finish("cancelled")
                self._counts["requests_finished"] += 1
            for req in [r for r in self._running if r.handle.cancelled.is_set()]:
                self._leave(req, "cancelled")
            free = self.max_batch - len(self._running)
            new = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        running = list(self._running)
        if running and not (len(running) == 1 and running[0].ngrams is not None and self._speculate(running[0])):
            self._decode(running)
        for req in new:
            slot = len(self._running)
            self._running.append(req)
            reused = self.prefix.load(req.prompt, self.cache, slot) if self.prefix is not None else 0
            if self.prefix is None:
                self.cache.clear(slot)
            ids = torch.tensor([req.prompt[reused:]], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache=self.cache.use([slot]), last_only=True)[:, -1]
            self._counts["prompt_tokens"] += len(req.prompt)
            self._counts["prefix_tokens_reused"] += reused
            self._sample([req], logits)
        self._counts["steps"] += 1

    def _decode(self, running: list[_Request]) -> None:
        """One token for each running request (slots 0..n-1), by the compiled step or the model's own forward."""
        n = len(running)
        if self.decoder is not None:
            logits = self.decoder([r.last for r in running], self.cache.lens[:n])
            for i in range(n):
                self.cache.lens[i] += 1
        else:
            tokens = torch.tensor([[r.last] for r in running], dtype=torch.long, device=self.device)
            logits = self.model(tokens, cache=self.cache.use(list(range(n))))[:, -1]
        self._sample(running, logits)

    def _speculate(self, req: _Request) -> bool:
        """One step of the request in slot 0 with drafted tokens verified; False (nothing done) without a draft."""
        assert req.ngrams is not None
        # Never draft past the request's last token: the fed positions then stay below the cache's last one.
        draft = req.ngrams.draft(min(self.draft, req.max_tokens - req.generated - 1))
        if not draft:
            return False
        start, fed = self.cache.lens[0], [req.last, *draft]
        if self.decoder is not None:
            logits = self.decoder.verify(fed, start)
        else:
            ids = torch.tensor([fed], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache=self.cache.use([0]))[0]
        greedy = logits.argmax(dim=-1).tolist()
        n = accepted(draft, greedy)
        self.cache.lens[0] = start + 1 + n  # the rejected drafts' keys and values are left to be overwritten
        self._counts["draft_tokens"] += len(draft)
        self._counts["draft_tokens_accepted"] += n
        for j in range(n + 1):
            self._counts["tokens_generated"] += 1
            if req.step(logits[j], greedy[j]) is not None:
                self._leave(req, None)
                break
        return True

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        # Plain greedy rows share one argmax: one wait for the result per step instead of one per row.
        plain = [i for i, r in enumerate(reqs) if r.plain_greedy]
        rows = logits if len(plain) == len(reqs) else logits[plain]
        picks = dict(zip(plain, rows.argmax(dim=-1).tolist(), strict=True)) if plain else {}
        for i, (req, row) in enumerate(zip(reqs, logits, strict=True)):
            done = req.step(row, picks.get(i))
            self._counts["tokens_generated"] += 1
            if done is not None:
                self._leave(req, None)

    def _leave(self, req: _Request, reason: str | None) -> None:
        """Free req's slot (finishing it with `reason` unless it finished itself); the last slot moves into it."""
        i = self._running.index(req)
        if self.prefix is not None:  # the slot holds the prompt and every sampled token fed back so far
            self.prefix.store((req.prompt + req.tokens)[: self.cache.lens[i]], self.cache, i)
        last = self._running.pop()
        if last is not req:
            self._running[i] = last
            self.cache.move(len(self._running), i)
        self.cache.clear(len(self._running))
        if reason is not None:
            req.finish(reason)
        self._counts["requests_finished"] += 1
