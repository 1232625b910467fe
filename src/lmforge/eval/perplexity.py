"""Held-out loss and bits per byte, and the xz reference a language model must beat.

Bits per byte is comparable across tokenizers and with compressors: the model's total negative log-likelihood of
the text, in bits, divided by the text's UTF-8 size. Each document is scored as it is seen in training, as
[BOS] + tokens; the BOS positions are never targets, so every scored token stands for bytes of the text. (BOS is
the tokenizer's `doc_start_id`: EOS for an imported tokenizer without BOS, as its documents were separated.)
Documents are packed into a stream cut into windows of `seq_len` tokens, each token scored once: by default the
windows do not overlap, so a token sees the context that precedes it inside its window; with a stride they slide,
and every token after the first window sees at least seq_len - stride tokens of context.
"""

from __future__ import annotations

import logging
import lzma
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import torch

from lmforge.objectives import token_nll
from lmforge.tokenizer import IGNORE_INDEX
from lmforge.train.progress import Heartbeat

log = logging.getLogger(__name__)


@dataclass
class TextScore:
    nll_nats: float  # summed over scored tokens
    tokens: int  # scored tokens (BOS excluded)
    bytes: int  # UTF-8 bytes of the scored text
    docs: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token, in nats."""
        return self.nll_nats / max(self.tokens, 1)

    @property
    def bpb(self) -> float:
        return self.nll_nats / math.log(2) / max(self.bytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "bpb": self.bpb}


def _token_stream(
    texts: Iterable[str], tokenizer, max_tokens: int | None, sink: Callable[[str], None] | None
) -> Iterator[tuple[list[int], int]]:
    """Yield ([BOS] + ids, utf8 bytes) per document, stopping before `max_tokens` scored tokens are exceeded.

    `sink` receives exactly the text that is scored (a trimmed last document included), e.g. an XzMeter.
    """
    budget = max_tokens
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        if budget is not None:
            if budget <= 0:
                return
            if len(ids) > budget:
                # Trim the last document at a token boundary; count only the bytes those tokens decode to.
                ids = ids[:budget]
                text = tokenizer.decode(ids, skip_special_tokens=False)
            budget -= len(ids)
        if sink is not None:
            sink(text)
        yield [tokenizer.doc_start_id] + ids, len(text.encode("utf-8"))


def _windows(stream: Iterator[tuple[list[int], int]], seq_len: int, bos_id: int, stats: TextScore,
             stride: int | None = None):  # fmt: skip
    """Cut the packed stream into (inputs, targets) windows of seq_len; targets that are BOS are ignored.

    With `stride` < seq_len, consecutive windows overlap by seq_len - stride tokens and the overlap's targets,
    already scored, are ignored: every token after the first window is then predicted with at least
    seq_len - stride tokens of context (sliding-window evaluation). The default cuts disjoint windows.
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    buf: list[int] = []
    done = 0  # leading targets of buf already scored by the previous window
    for ids, nbytes in stream:
        buf.extend(ids)
        stats.bytes += nbytes
        stats.docs += 1
        while len(buf) >= seq_len + 1:
            yield _window(buf[: seq_len + 1], bos_id, done)
            buf = buf[stride:]
            done = seq_len - stride
    if len(buf) - 1 > done:
        yield _window(buf, bos_id, done)


def _window(chunk: list[int], bos_id: int, skip: int = 0) -> tuple[list[int], list[int]]:
    x = chunk[:-1]
    y = [IGNORE_INDEX if i < skip or t == bos_id else t for i, t in enumerate(chunk[1:])]
    return x, y


@torch.no_grad()
def score_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Iterable[str],
    *,
    seq_len: int,
    batch_size: int = 16,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    sink: Callable[[str], None] | None = None,
    stride: int | None = None,
) -> TextScore:
    """Negative log-likelihood of `texts` under `model`: summed nats, scored tokens and bytes; `stride` < seq_len
    scores with overlapping (sliding) windows."""
    model.eval()
    stats = TextScore(0.0, 0, 0, 0)
    batch: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        width = max(len(x) for x, _ in batch)
        xs = torch.full((len(batch), width), tokenizer.pad_id, dtype=torch.long)
        ys = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            xs[i, : len(x)] = torch.tensor(x)
            ys[i, : len(y)] = torch.tensor(y)
        nll = token_nll(model, xs.to(device), ys.to(device))
        stats.nll_nats += float(nll.double().sum())
        stats.tokens += int((ys != IGNORE_INDEX).sum())
        batch.clear()

    heartbeat = Heartbeat(log)
    stream = _token_stream(texts, tokenizer, max_tokens, sink)
    for window in _windows(stream, seq_len, tokenizer.doc_start_id, stats, stride):
        batch.append(window)
        if len(batch) == batch_size:
            flush()
            heartbeat.beat(lambda: f"held-out: {stats.tokens:,} tokens of {stats.docs:,} documents scored so far...")
    if batch:
        flush()
    return stats


class XzMeter:
    """What `xz -9e` achieves on the scored text, measured in-process with the same LZMA2 preset (9 + extreme).

    Two figures, because they answer different questions:
    - `bpb`: every document compressed on its own as a raw LZMA2 stream (no container header, which favours xz).
      The model also scores each document from its own BOS (seeing at most the tail of the previous document in
      the same window), so this is the like-for-like reference.
    - `concat_bpb`: all documents as one .xz stream, which lets xz copy repeated text (licence headers, shared
      idioms) from one held-out file into the next - something the model cannot do.
    """

    FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

    def __init__(self) -> None:
        self._stream = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
        self.raw_bytes = 0
        self.per_doc_bytes = 0
        self._stream_bytes = 0
        self._final: int | None = None

    def __call__(self, text: str) -> None:
        data = text.encode("utf-8")
        self.raw_bytes += len(data)
        self.per_doc_bytes += len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=self.FILTERS))
        self._stream_bytes += len(self._stream.compress(data))

    @property
    def bpb(self) -> float:
        return 8.0 * self.per_doc_bytes / self.raw_bytes if self.raw_bytes else float("nan")

    @property
    def concat_bpb(self) -> float:
        if self._final is None:
            self._final = self._stream_bytes + len(self._stream.flush())
        return 8.0 * self._final / self.raw_bytes if self.raw_bytes else float("nan")


def xz_bits_per_byte(texts: Iterable[str]) -> tuple[float, float]:
    """(per-document, concatenated) bits per byte that `xz -9e` achieves on the texts; see XzMeter."""
    meter = XzMeter()
    for text in texts:
        meter(text)
    return meter.bpb, meter.concat_bpb
