"""What every reader shares: the `Document` record, the `ErrorLog` of skipped records, and the byte-level
reading (decompression in bounded chunks, line splitting, text checks) that readers.py, tables.py and web.py all
use. It sits below them so the format readers need not import readers.py, which dispatches to them.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 16  # small enough that a corrupt file loses little of what precedes the damage


@dataclass
class Document:
    """One unit of text. `id` is stable across runs: a path relative to the source, or `path:line` for records."""

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


class ErrorLog:
    """Counts skipped records by reason and keeps the first `max_messages` `file:line: reason` messages."""

    def __init__(self, max_messages: int = 20) -> None:
        self.max_messages = max_messages
        self._counts: Counter[str] = Counter()
        self.messages: list[str] = []

    def add(self, reason: str, file: str | Path, line: int | None = None) -> None:
        self._counts[reason] += 1
        where = f"{file}:{line}" if line is not None else str(file)
        message = _printable(f"{where}: {reason}")  # a non-UTF-8 file name must not make stats.json unwritable
        log.debug("skipped %s", message)
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    def count(self, reason: str) -> int:
        return self._counts[reason]

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def reasons(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": self.reasons, "messages": list(self.messages)}

    def merge(self, other: dict[str, Any]) -> None:
        """Add another log's `to_dict()` (a worker's): its counts, and its messages while there is room."""
        self._counts.update(other["by_reason"])
        self.messages += other["messages"][: max(0, self.max_messages - len(self.messages))]


class _CorruptCompressed(Exception):
    """A compressed file ended early or holds bytes its decompressor rejects."""


class _CorruptFile(Exception):
    """A file its format's library cannot read past some point; args: (reason counted, library's message)."""


def _gzip_chunks(path: Path) -> Iterator[bytes]:
    # Opened outside the try: a file that cannot be opened (a dangling symlink) is unreadable, not corrupt.
    with open(path, "rb") as raw:
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                # read1 hands over what one underlying read decoded; read(n) would hold it back until n bytes or
                # the end.
                while chunk := f.read1(_CHUNK_BYTES):
                    yield chunk
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is an EOFError
            raise _CorruptCompressed(str(e)) from e


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    import zstandard

    # A decompressobj rather than zstandard's stream_reader: the reader returns a truncated frame's data as if the
    # file had ended cleanly, and a truncated file must be reported, not passed off as complete.
    dctx = zstandard.ZstdDecompressor()
    try:
        with open(path, "rb") as f:
            dobj, pending = dctx.decompressobj(), False
            while data := f.read(_CHUNK_BYTES):
                while data:
                    out = dobj.decompress(data)
                    if out:
                        yield out
                    pending = not dobj.eof
                    # A file may hold several concatenated frames (zstd -c a b > c); each needs a fresh decompressor.
                    data = dobj.unused_data if dobj.eof else b""
                    if dobj.eof:
                        dobj = dctx.decompressobj()
    except zstandard.ZstdError as e:
        raise _CorruptCompressed(str(e)) from e
    if pending:
        raise _CorruptCompressed("zstd frame ends before its end marker")


def _plain_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            yield chunk


def _chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed when its name ends in `.gz` or `.zst`, in chunks of bounded size."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return _gzip_chunks(path)
    if suffix == ".zst":
        return _zstd_chunks(path)
    return _plain_chunks(path)


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a stream of byte chunks into lines that keep their line feed, the last one possibly without it."""
    # The unfinished line is kept as a list of pieces: concatenating chunk by chunk would be quadratic in the length
    # of one long line (a multi-megabyte jsonl record).
    pending: list[bytes] = []
    for chunk in chunks:
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            pending.append(chunk)
            continue
        pending.append(lines[0])
        yield b"".join(pending) + b"\n"
        for line in lines[1:-1]:
            yield line + b"\n"
        pending = [lines[-1]]
    tail = b"".join(pending)
    if tail:
        yield tail


def _checked_text(value: Any, path: Path, line: int, errors: ErrorLog) -> str | None:
    if not isinstance(value, str):
        errors.add("text not a string", path, line)
        return None
    if not value.strip():
        errors.add("empty", path, line)
        return None
    try:
        # JSON escapes can smuggle in lone surrogates, which no UTF-8 writer or tokenizer downstream accepts.
        value.encode("utf-8")
    except UnicodeEncodeError:
        errors.add("invalid unicode", path, line)
        return None
    return value


def _printable(text: str) -> str:
    """`text` with lone surrogates escaped (`\\udcff`), so that it always encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
