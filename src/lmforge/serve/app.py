"""The OpenAI-compatible server (`lmforge serve`): FastAPI routes over the continuous-batching engine.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions, /v1/chat/completions and
/v1/embeddings; GET / and /static/ serve the web chat page. Each request is checked in a fixed order, each refusal
answered in OpenAI's error format (errors.py): shutting down 503, API key 401, body size 413, JSON 400, fields 400
(naming the field), model 404, concurrency 429, prompt longer than the context 400 (`context_length_exceeded`).
`max_tokens` is capped to what the prompt leaves of the context. A streaming response holds its concurrency slot
until the stream ends; a client that disconnects mid-stream cancels its request in the engine.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids as chat_prompt_ids
from lmforge.infer.batching import BatchEngine
from lmforge.rag.answer import prompt_budget
from lmforge.serve.errors import ApiError, schema_error
from lmforge.serve.metrics import Metrics
from lmforge.serve.rag import Grounded, ground
from lmforge.serve.responses import Choice, Flight, Logprobs, Slots, Stream, told
from lmforge.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, Unsupported, _Sampling
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}  # fmt: skip
# texts -> (unit-norm embeddings [N, d], tokens read)
Embedder = Callable[[list[str]], tuple[np.ndarray, int]]


class _CountRequests:
    """ASGI middleware counting every response by route and status (pure ASGI, so streams pass through as they are
    written); paths outside ROUTES count as "other", so a scan cannot grow the metrics without bound."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, marking the app as draining the moment a stop signal arrives: requests that still reach
    it (on a kept-alive connection) get 503 while the ones in flight finish."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.serving.draining = True
        super().handle_exit(sig, frame)


def checkpoint_embedder(model: Any, tokenizer: Tokenizer, max_len: int) -> Embedder:
    """`lmforge.embed.embed_texts` on `model` (mean-pooled, unit-norm) and the tokens it read: each text is BOS plus
    at most max_len - 1 of its tokens."""
    from lmforge.embed import embed_texts

    def embed(texts: list[str]) -> tuple[np.ndarray, int]:
        tokens = sum(min(1 + len(ids), max_len) for ids in tokenizer.encode_batch(texts))
        return embed_texts(model, tokenizer, texts, max_len=max_len), tokens

    return embed


def create_app(engine: BatchEngine, tokenizer: Tokenizer, *, model_name: str, api_keys: Sequence[str] = (),
               max_concurrency: int = 64, max_body_bytes: int = 1_000_000, embedder: Embedder | None = None,
               rag: Any = None) -> FastAPI:  # fmt: skip
    """The app over a (not yet started) `engine`: its lifespan starts the engine and, at shutdown, lets it finish the
    requests it holds. `api_keys`: when any, every /v1 route and /metrics need `Authorization: Bearer KEY`.
    `embedder` answers /v1/embeddings (404 without one); `rag`, an opened `lmforge.rag.index.Index`, answers chat
    requests with `"rag": true` (rag.py)."""
    if max_concurrency < 1 or max_body_bytes < 1:
        raise ValueError(f"max_concurrency={max_concurrency} and max_body_bytes={max_body_bytes} must be >= 1")
    keys = [k.encode() for k in api_keys]
    state = Slots(max_concurrency)
    metrics = Metrics()
    context = engine.max_seq_len

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        state.draining = True
        engine.stop(drain=True)

    app = FastAPI(title="lmforge serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serving = state
    app.add_middleware(_CountRequests, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return exc.response(headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail)).response()

    def authorize(request: Request) -> None:
        if state.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica", code="shutting_down")
        if not keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Every key is compared (constant time each), so the time taken does not tell which one nearly matched.
        matches = [hmac.compare_digest(given.strip().encode(), k) for k in keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with a key "
                           "the server was started with", code="invalid_api_key")  # fmt: skip

    async def body(request: Request, schema: type[BaseModel]) -> Any:
        authorize(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large(int(declared))
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > max_body_bytes:
                raise _too_large(len(raw))
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                           code="invalid_json")  # fmt: skip
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise schema_error(e) from None
        if req.model != model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {model_name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")  # fmt: skip
        return req

    def acquire() -> None:
        if not state.acquire():
            raise ApiError(429, f"the server is at its limit of {max_concurrency} concurrent requests; retry shortly",
                           code="too_many_requests")  # fmt: skip

    def _too_large(size: int) -> ApiError:
        return ApiError(413, f"the request body has {size} bytes, more than this server's limit of "
                        f"{max_body_bytes}", code="request_too_large")  # fmt: skip

    def submit(req: _Sampling, ids: list[int], stop_ids: list[int], default_tokens: int):
        """The engine request for prompt `ids`, max_tokens capped to what the prompt leaves of the context."""
        try:
            req.check_supported()
        except Unsupported as e:
            raise ApiError(400, str(e), param=e.param, code="unsupported_value") from None
        if len(ids) >= context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens and the model's context is {context} tokens: "
                           "shorten the prompt", param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")  # fmt: skip
        wanted = req.wanted_tokens() or default_tokens
        params = req.sampling_params(min(wanted, context - len(ids)), stop_ids)
        try:
            return engine.submit(ids, params)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        except RuntimeError as e:  # the engine is stopping
            raise ApiError(503, str(e), code="shutting_down") from None

    async def respond(request: Request, req: _Sampling, handle: Any, prompt_tokens: int, started: float,
                      chat: bool, grounded: Grounded | None = None) -> Any:  # fmt: skip
        """The response of a submitted request (`handle`; None for a RAG refusal, the model not run); the
        concurrency slot is released when it has been sent. A client that leaves before a whole (non-streamed)
        response is ready cancels its request, as a stream's does."""
        out = Choice(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), model_name,
                     Logprobs(tokenizer, chat), chat, grounded.cite if grounded else None)  # fmt: skip
        if handle is None:
            events, close, ready = told(grounded.refusal), state.release, lambda: False
        else:
            flight = Flight(handle, prompt_tokens, started, metrics, state)
            events, close, ready = flight.events(), flight.close, flight.ready
        if req.stream:
            return Stream(out.stream(events, req.include_usage, ready), close, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache"})  # fmt: skip
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle)) if handle is not None else None
        try:
            return await out.whole(events, close)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def cancel_on_disconnect(request: Request, handle: Any) -> None:
        """Wait for the client to leave (the body is read: the next message is the disconnect), then cancel."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "draining" if state.draining else "ok"}

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        authorize(request)
        stats = engine.stats
        text = metrics.render(stats.get("running", 0), stats.get("waiting", 0), state.in_flight,
                              stats.get("draft_tokens", 0), stats.get("draft_tokens_accepted", 0))  # fmt: skip
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "lmforge", "max_model_len": context}]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        started = time.perf_counter()
        req: CompletionRequest = await body(request, CompletionRequest)
        ids = req.prompt if isinstance(req.prompt, list) else [tokenizer.doc_start_id, *tokenizer.encode(req.prompt)]
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"prompt holds token ids outside the vocabulary [0, {tokenizer.vocab_size})",
                           param="prompt", code="invalid_value")  # fmt: skip
        acquire()
        try:  # OpenAI's default length for completions is 16 tokens
            handle = submit(req, ids, tokenizer.eos_ids, 16)
        except BaseException:
            state.release()
            raise
        return await respond(request, req, handle, len(ids), started, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        started = time.perf_counter()
        req: ChatRequest = await body(request, ChatRequest)
        conversation = [Message(m.role, m.content) for m in req.messages]
        grounded = await ground_in_docs(req, conversation) if req.rag else None
        if grounded is not None:
            conversation = grounded.conversation
        acquire()
        try:  # a chat reply may use all the context its prompt leaves
            ids = chat_prompt_ids(tokenizer, conversation)
            handle = None if grounded and grounded.refusal else submit(req, ids, tokenizer.stop_ids, context)
        except BaseException:
            state.release()
            raise
        return await respond(request, req, handle, len(ids), started, True, grounded)

    async def ground_in_docs(req: ChatRequest, conversation: list[Message]) -> Grounded:
        if rag is None:
            raise ApiError(400, "rag needs a document index: start the server with --docs INDEX", param="rag",
                           code="unsupported_value")  # fmt: skip
        if conversation[-1].role != "user":
            raise ApiError(400, "with rag, the last message must be the user's question", param="messages",
                           code="invalid_value")  # fmt: skip
        budget = prompt_budget(context, req.wanted_tokens() or context)
        try:
            return await run_in_threadpool(ground, rag, tokenizer, conversation, budget)
        except ValueError as e:  # not even the best source fits with the question
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        req: EmbeddingRequest = await body(request, EmbeddingRequest)
        if embedder is None:
            raise ApiError(404, "this server was started without embeddings", code="not_found")
        acquire()
        try:
            vectors, tokens = await run_in_threadpool(embedder, req.input)
        finally:
            state.release()
        encode = ((lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if req.encoding_format == "base64"
                  else (lambda v: v.astype(float).tolist()))  # fmt: skip
        return {"object": "list", "model": model_name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}

    @app.get("/")
    async def chat_page() -> Response:
        page = STATIC / "chat.html"
        if not page.is_file():
            raise ApiError(404, "the web chat page is not installed")
        return FileResponse(page, headers=PAGE_HEADERS)

    return app
