"""A scripted stand-in for the continuous-batching engine (the engine contract's submit(), replying with a text
the test sets, piece by piece, at a pace it sets) and an ASGI app served by uvicorn in a thread on a loopback port:
for tests that need a live server whose replies they control (test_chat_page.py)."""

import asyncio
import threading

from helpers import wait_for

from lmforge.infer.batching import Finished, SamplingParams, TokenEvent


class ScriptedHandle:
    """A request of the scripted engine: yields `pieces` as TokenEvents, `delay` seconds apart, then Finished; a
    cancel() ends it with finish_reason "cancelled" at the next piece."""

    def __init__(self, rid: int, n_prompt: int, pieces: list[str], delay: float) -> None:
        self.id, self.n_prompt, self.pieces, self.delay = rid, n_prompt, pieces, delay
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def ready(self) -> bool:
        return False  # each piece is its own chunk, so a test sees the reply arrive piece by piece

    def _finished(self, reason: str, n: int) -> Finished:
        return Finished(reason, self.n_prompt, n, "".join(self.pieces[:n]))

    async def aiter(self):
        for n, piece in enumerate(self.pieces):
            await asyncio.sleep(self.delay)
            if self.cancelled.is_set():
                yield self._finished("cancelled", n)
                return
            yield TokenEvent(n, piece)
        yield self._finished("stop", len(self.pieces))


class ScriptedEngine:
    """The engine contract with a reply the test sets: `reply` in pieces of 3 characters, `delay` s apart. Keeps
    every request's prompt ids and SamplingParams, and its handle."""

    def __init__(self, max_seq_len: int = 128) -> None:
        self.max_seq_len = max_seq_len
        self.reply, self.delay = "Hello from the engine.", 0.0
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.handles: list[ScriptedHandle] = []

    def start(self) -> None:
        pass

    def stop(self, drain: bool = True) -> None:
        pass

    @property
    def stats(self) -> dict:
        return {"running": 0, "waiting": 0, "tokens_generated": 0}

    def submit(self, ids: list[int], params: SamplingParams) -> ScriptedHandle:
        self.requests.append((list(ids), params))
        pieces = [self.reply[i:i + 3] for i in range(0, len(self.reply), 3)]
        self.handles.append(ScriptedHandle(len(self.handles), len(ids), pieces, self.delay))
        return self.handles[-1]


class LiveApp:
    """An ASGI app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started, "uvicorn to start", timeout=20)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
