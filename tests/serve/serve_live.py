"""Helpers for the server's live tests: a tiny chat checkpoint, `lmforge serve CKPT` in a subprocess on a free
loopback port (the labelling app's live-server pattern, tests/label/live.py), and readers of its SSE and metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
from helpers import tiny_chat_model
from label.live import Server

MODEL = "tiny"
KEY = "sk-test-key"
CONTEXT = 1024  # long enough that a generation outlives the time a test needs to act on it


def serve_checkpoint(directory: Path) -> Path:
    """The tiny chat model of tests/helpers.py with a 1024-token context."""
    return tiny_chat_model(directory, max_seq_len=CONTEXT)


class ServeProcess(Server):
    """`lmforge serve CKPT --port P --model-name tiny` plus `options`, in a subprocess."""

    def __init__(self, checkpoint: Path, log: Path, *options: str) -> None:
        super().__init__(checkpoint, log)
        self.options = options

    def command(self) -> list[str]:
        return [*super().command()[:3], "serve", str(self.db), "--port", str(self.port), "--model-name", MODEL,
                "--device", "cpu", *self.options]  # fmt: skip


def sse_events(lines) -> list:
    """The JSON chunks of an SSE stream's `data:` lines, then the string "[DONE]" if the stream ended with it."""
    out: list = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one series in Prometheus text (0 when absent)."""
    m = re.search(rf"^{re.escape(name + (('{' + labels + '}') if labels else ''))} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for_metric(url: str, name: str, want: float, *, labels: str = "", timeout: float = 10.0) -> str:
    """GET /metrics until series `name` equals `want`; the metrics text then (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        if metric(text, name, labels) == want or time.monotonic() > deadline:
            assert metric(text, name, labels) == want, f"{name}{{{labels}}} != {want}:\n{text}"
            return text
        time.sleep(0.05)
