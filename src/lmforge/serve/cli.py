"""`lmforge serve CKPT`: the OpenAI-compatible server over one checkpoint, until Ctrl-C or SIGTERM.

The heavy imports (torch, the model, uvicorn) wait until the command runs, so `lmforge --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import List, Optional

import typer

from lmforge import verbs
from lmforge.hosts import is_loopback

log = logging.getLogger(__name__)

KEYS_ENV = "LMFORGE_API_KEYS"  # comma-separated, for keys that should not appear in a process listing


def api_keys(given: list[str], env: str | None) -> list[str]:
    """The keys of --api-key and of LMFORGE_API_KEYS (comma-separated), blanks dropped, order kept, no repeats."""
    keys = [*given, *(env or "").split(",")]
    return list(dict.fromkeys(k.strip() for k in keys if k.strip()))


def serve(
    checkpoint: Path = typer.Argument(..., help="A model: an lmforge checkpoint (runs/NAME/sft/final), a Hugging "
                                      "Face model directory, or a hub id in the local cache."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs an API key."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free one)."),
    api_key: Optional[List[str]] = typer.Option(None, "--api-key", help=f"A key clients must send as 'Authorization: "
                                                f"Bearer KEY' (repeatable; also {KEYS_ENV}, comma-separated)."),
    model_name: Optional[str] = typer.Option(None, help="The model id clients name (default: CHECKPOINT as given)."),
    max_batch: int = typer.Option(32, min=1, help="Requests decoded together (KV cache slots)."),
    max_seq_len: Optional[int] = typer.Option(None, min=2, help="Context per request (default and at most: the "
                                              "model's)."),
    max_concurrency: int = typer.Option(64, min=1, help="Open generation and embedding requests; more get 429."),
    max_body_bytes: int = typer.Option(1_000_000, min=1, help="Largest request body; larger ones get 413."),
    docs: Optional[Path] = typer.Option(None, "--docs", help="An index (lmforge rag index): chat requests with "
                                        "\"rag\": true are answered from it, with checked citations."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of the model's forward "
                                          "(default: torch's). Small models on few cores often decode faster on "
                                          "one: measure with benchmarks/serve_load.py."),
    compile: bool = typer.Option(False, "--compile", help="Compile the decode step (torch.compile, one graph per "
                                 "batch-size bucket, compiled before the server answers: seconds per bucket). "
                                 "Faster decoding for small models; needs a C++ compiler on the CPU."),
    draft: int = typer.Option(0, "--draft", min=0, help="N-gram speculative decoding: while one greedy request "
                              "decodes alone, verify up to N tokens guessed from its own text in each step (the "
                              "output is unchanged; text that repeats itself decodes faster). 0: off."),
) -> None:
    """Serve a model over OpenAI's API (completions, chat, embeddings; streaming) with a web chat page at /.
    SIGTERM or Ctrl-C stops accepting requests, finishes those in flight, and exits 0."""
    keys = api_keys(api_key or [], os.environ.get(KEYS_ENV))
    if not is_loopback(host) and not keys:
        verbs.fail(f"--host {host} lets other machines reach the server, so it needs an API key: pass --api-key KEY "
                   f"or set {KEYS_ENV}, or bind to 127.0.0.1", 2)  # fmt: skip
    import torch
    import uvicorn

    from lmforge.infer.batching import BatchEngine
    from lmforge.infer.loading import load_for_generation
    from lmforge.rag.index import Index
    from lmforge.serve.app import DrainingServer, checkpoint_embedder, create_app

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        index = Index.open(docs) if docs is not None else None
        model, tok = load_for_generation(checkpoint, device)
        engine = BatchEngine(model, tok, max_batch=max_batch, max_seq_len=max_seq_len, compile=compile,
                             draft=draft)
    except (FileNotFoundError, ValueError) as e:
        verbs.fail(str(e), 2)
    app = create_app(engine, tok, model_name=model_name or str(checkpoint), api_keys=keys,
                     max_concurrency=max_concurrency, max_body_bytes=max_body_bytes,
                     embedder=checkpoint_embedder(model, tok, engine.max_seq_len), rag=index)  # fmt: skip
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info"))
    # uvicorn re-raises the stop signal against the handler it found at start: this one, so a requested stop
    # ends with status 0 rather than the signal's default (death).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    server.run()
    log.info("served %s on %s:%d; stopped", model_name or checkpoint, host, port)


def _stopped(signum: int, frame: object) -> None:
    log.info("stopped by %s", signal.Signals(signum).name)
