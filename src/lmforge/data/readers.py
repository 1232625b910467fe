"""Readers: turn files on disk into a stream of `Document`s, counting what they cannot read.

Supported sources:
- a text file (`.py`, `.txt`, `.md`, any other extension): one document per file, read as strict UTF-8, or with
  `text_split="paragraph"` one document per block of non-blank lines (for prose corpora kept as one big file), a
  block longer than `max_chars` split into one document per line (one article or paragraph per line, as in
  WikiText). `text_split="auto"` splits that way only a plain-text (not code) file longer than `max_chars`;
- a `.jsonl` file: one document per non-blank line, the text taken from the `text_field` key;
- a `.csv` or `.parquet` file: one document per row, the text taken from the `text_field` column (`tables.py`;
  parquet needs `pyarrow`, imported only when a parquet file is read);
- a WARC file (`.warc`, `.wet`): one document per HTML response (main content only) or WET text record; an HTML
  file (`.html`, `.htm`): one document of its main content; a directory saved by Hugging Face `datasets`
  (`save_to_disk`): one document per row. `.wat` files hold metadata only and yield nothing. See `web.py`.
- a directory: every file under it whose extension is listed (by default `DEFAULT_EXTENSIONS`, every format
  above), walked recursively in sorted order, so two runs over the same tree yield the same documents in the same
  order. A listed extension also selects its gzip (`.gz`) and zstandard (`.zst`) compressed files (`.jsonl`
  selects `.jsonl.gz`). What the walk leaves out (other extensions, pipes and devices, links out of the source,
  link loops, hidden and cache directories) is counted per reason when a `skipped` log is given (see `files.py`).

Compressed files (`x.jsonl.gz`, `x.txt.zst`, ...) are read as the format under the compression suffix, streamed
through the decompressor. A truncated or corrupt compressed file keeps the documents read before the damage and
counts one "corrupt compressed file" error naming the file; reading goes on with the next file. A file that cannot
be opened or read at all (a dangling symlink, no read permission) counts one "unreadable file" error the same way,
and a parquet file pyarrow cannot read one "corrupt parquet file" error.

A bad record (undecodable bytes, a NUL byte, malformed JSON, an empty text) is skipped and counted in an
`ErrorLog` under its reason, with a `file:line: reason` message. A record without the configured text field is a
setting error, not a bad record, and raises `ValueError` at the first such record.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lmforge.data.files import CODE_SUFFIXES, DEFAULT_EXTENSIONS, format_suffix, walk

log = logging.getLogger(__name__)

_TEST_DIRS = frozenset({"test", "tests"})
_CHUNK_BYTES = 1 << 16  # small enough that a corrupt file loses little of what precedes the damage
TextSplit = Literal["auto", "file", "paragraph"]
_TEXT_SPLITS = ("auto", "file", "paragraph")
# Deleting UTF-8 continuation bytes leaves one byte per character.
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


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


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _text_document(data: bytes, path: Path, doc_id: str, errors: ErrorLog, first_line: int = 1) -> Document | None:
    """`data` as a document, or None with the reason counted; `first_line` is where `data` starts in the file."""
    nul = data.find(b"\0")
    if nul >= 0:
        errors.add("binary", path, first_line - 1 + _line_of(data, nul))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.add("not utf-8", path, first_line - 1 + _line_of(data, e.start))
        return None
    if not text.strip():
        errors.add("empty", path)
        return None
    return Document(id=doc_id, text=text, source=str(path))


def _read_text_file(path: Path, doc_id: str, errors: ErrorLog) -> Document | None:
    return _text_document(b"".join(_chunks(path)), path, doc_id, errors)


def _utf8_chars(data: bytes) -> int:
    """The number of characters in UTF-8 `data` (exact for valid UTF-8), without decoding it."""
    return len(data.translate(None, _CONTINUATION_BYTES))


def _block_documents(blocks: Iterable[tuple[int, bytes]], path: Path, rel: str, errors: ErrorLog
                     ) -> Iterator[Document]:  # fmt: skip
    """Each `(first line, bytes)` block as a document, id `rel:first_line`, without its final line break."""
    for start, data in blocks:
        doc = _text_document(data.removesuffix(b"\n").removesuffix(b"\r"), path, f"{rel}:{start}", errors, start)
        if doc is not None:
            yield doc


def _read_paragraphs(lines: Iterable[bytes], path: Path, rel: str, errors: ErrorLog, max_chars: int | None
                     ) -> Iterator[Document]:  # fmt: skip
    """One document per block of non-blank lines, id `rel:first_line`, without the block's final line break.

    A block longer than `max_chars` characters becomes one document per line instead, so that a corpus kept as one
    paragraph or article per line, without blank lines between them, is not one document dropped as too long;
    a block is then held in memory only up to `max_chars`.
    """
    block: list[tuple[int, bytes]] = []
    chars, by_line = 0, False
    # The trailing empty line flushes the last block through the same path as every other block.
    for lineno, line in enumerate(itertools.chain(lines, [b""]), start=1):
        if line.strip():
            block.append((lineno, line))
            chars += _utf8_chars(line)
            by_line = by_line or (max_chars is not None and chars > max_chars)
            if by_line:
                yield from _block_documents(block, path, rel, errors)
                block = []
        else:
            if block:
                yield from _block_documents([(block[0][0], b"".join(data for _, data in block))], path, rel, errors)
            block, chars, by_line = [], 0, False


def _read_text(path: Path, rel: str, text_split: TextSplit, max_chars: int | None, errors: ErrorLog
               ) -> Iterator[Document]:  # fmt: skip
    """A text file as one document, or as paragraphs (`paragraph`, or `auto` for plain text over `max_chars`)."""
    if text_split == "paragraph":
        yield from _read_paragraphs(_lines(_chunks(path)), path, rel, errors, max_chars)
        return
    if text_split == "file" or max_chars is None or format_suffix(path) in CODE_SUFFIXES:
        doc = _read_text_file(path, rel, errors)
    else:
        # auto: read until the text proves longer than max_chars; a shorter file stays one document.
        lines, head, chars = _lines(_chunks(path)), [], 0
        for line in lines:
            head.append(line)
            chars += _utf8_chars(line)
            if chars > max_chars:
                log.debug("%s: over data.max_chars=%d characters: one document per paragraph", path, max_chars)
                yield from _read_paragraphs(itertools.chain(head, lines), path, rel, errors, max_chars)
                return
        doc = _text_document(b"".join(head), path, rel, errors)
    if doc is not None:
        yield doc


def _missing_field_error(path: Path, line: int, text_field: str, keys: Iterable[str]) -> ValueError:
    return ValueError(
        f"{path}:{line}: record has no field '{text_field}' (data.text_field); fields present: {sorted(keys)}. "
        f"Set data.text_field to the key that holds the text."
    )


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


def _read_jsonl(path: Path, rel: str, text_field: str, errors: ErrorLog) -> Iterator[Document]:
    for lineno, raw in enumerate(_lines(_chunks(path)), start=1):
        if not raw.strip():
            continue
        try:
            # utf-8-sig on the first line: a file saved with a byte-order mark (Windows tools) would otherwise lose
            # its first record as malformed JSON.
            record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError:
            errors.add("not utf-8", path, lineno)
            continue
        except (ValueError, RecursionError):
            # Not only JSONDecodeError: an integer literal over Python's 4300-digit limit raises a plain ValueError
            # (which would pass for the missing-field setting error), and deep nesting ([[[[... 100k levels) a
            # RecursionError. Both are records this parser cannot read, so they count like malformed JSON.
            errors.add("malformed json", path, lineno)
            continue
        if not isinstance(record, dict):
            errors.add("not a json object", path, lineno)
            continue
        if text_field not in record:
            raise _missing_field_error(path, lineno, text_field, record.keys())
        text = _checked_text(record[text_field], path, lineno, errors)
        if text is None:
            continue
        meta = {k: v for k, v in record.items() if k != text_field}
        yield Document(id=f"{rel}:{lineno}", text=text, source=str(path), meta=meta)


def _read_format(path: Path, rel: str, text_field: str, text_split: TextSplit, max_chars: int | None,
                 errors: ErrorLog) -> Iterator[Document]:  # fmt: skip
    suffix = format_suffix(path)
    if suffix == ".jsonl":
        yield from _read_jsonl(path, rel, text_field, errors)
    elif suffix in (".csv", ".parquet"):
        from lmforge.data import tables

        yield from (tables.read_csv if suffix == ".csv" else tables.read_parquet)(path, rel, text_field, errors)
    elif suffix in (".warc", ".wet"):
        from lmforge.data.web import read_warc  # imports fastwarc and resiliparse, needed only for web sources

        yield from read_warc(path, rel, errors)
    elif suffix in (".html", ".htm"):
        from lmforge.data.web import read_html

        yield from read_html(path, rel, errors)
    elif suffix == ".wat":
        log.info("%s: skipped, a WAT file holds metadata, not text", path)
    else:
        yield from _read_text(path, rel, text_split, max_chars, errors)


def _printable(text: str) -> str:
    """`text` with lone surrogates escaped (`\\udcff`), so that it always encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _read_file(path: Path, rel: str, text_field: str, text_split: TextSplit, max_chars: int | None,
               errors: ErrorLog) -> Iterator[Document]:  # fmt: skip
    docs = _read_format(path, rel, text_field, text_split, max_chars, errors)
    if _printable(str(path)) != str(path):
        # A file name that is not valid UTF-8 reaches Python with its bad bytes as lone surrogates (surrogateescape);
        # in an id or source they crash everything that encodes them downstream (split hashing, JSON output).
        docs = (replace(d, id=_printable(d.id), source=_printable(d.source)) for d in docs)
    try:
        yield from docs
    except _CorruptCompressed as e:
        # The documents already yielded were whole records read before the damage, so they stand; the rest of the
        # file is unreadable, which is one error for the file, not one per lost record.
        log.warning("%s: corrupt compressed file (%s); kept the documents read before it", path, e)
        errors.add("corrupt compressed file", path)
    except _CorruptFile as e:
        reason, detail = e.args
        log.warning("%s: %s (%s); kept the documents read before it", path, reason, detail)
        errors.add(reason, path)
    except OSError as e:
        # A dangling symlink, a file removed since the directory walk or one without read permission: one bad file
        # must not end a run over a whole tree. Documents already yielded stand, as for a corrupt compressed file.
        log.warning("%s: unreadable file (%s); kept the documents read before it", path, e)
        errors.add("unreadable file", path)


def read_documents(
    source: str | Path,
    *,
    text_field: str = "text",
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    errors: ErrorLog | None = None,
    text_split: TextSplit = "file",
    max_chars: int | None = None,
    hf_split: str | None = None,
    follow_symlinks: bool = False,
    skipped: ErrorLog | None = None,
) -> Iterator[Document]:
    """Stream the documents of a file or a directory tree (see the module docstring for formats and ids).

    `extensions` selects files when `source` is a directory; a single file is read whatever its extension.
    `text_split` makes each text file one document ("file"), one document per blank-line-separated block
    ("paragraph", a block over `max_chars` characters one per line), or a file over `max_chars` one per block if it
    is not code ("auto"); jsonl, csv and parquet records are unaffected. Skipped records are counted in `errors`,
    files the directory walk leaves out in `skipped`, when given. Links whose target is outside a directory source
    are not read unless `follow_symlinks`. `hf_split` reads only that split of a saved `DatasetDict`; by default
    every split is read.
    """
    if text_split not in _TEXT_SPLITS:
        raise ValueError(f"text_split = {text_split!r}: allowed values are {list(_TEXT_SPLITS)}")
    root = Path(source)
    errors = errors if errors is not None else ErrorLog()
    from lmforge.data import web

    if root.is_dir() and web.is_hf_dataset(root):
        yield from web.read_hf_dataset(root, text_field, errors, split=hf_split)
        return
    if hf_split is not None:
        raise ValueError(f"data.hf_split is set, but {root} is not a dataset saved by DatasetDict.save_to_disk")
    check_source(root)
    if root.is_file():
        yield from _read_file(root, root.name, text_field, text_split, max_chars, errors)
        return
    for path in walk(root, extensions, follow_symlinks=follow_symlinks, skipped=skipped):
        yield from _read_file(path, path.relative_to(root).as_posix(), text_field, text_split, max_chars, errors)


def check_source(source: Path) -> None:
    """Raise a clear error unless `source` is a regular file or a directory (not a pipe, socket or device)."""
    if source.is_file() or source.is_dir():
        return
    if not source.exists():
        raise FileNotFoundError(f"data source {source} does not exist (data.source)")
    raise ValueError(f"data source {source} is not a regular file or a directory (a named pipe, socket or device "
                     f"cannot be read to its end); point data.source at a file or a directory")  # fmt: skip


def source_files(
    root: str | Path, extensions: Iterable[str], *, follow_symlinks: bool = False, skipped: ErrorLog | None = None
) -> list[Path]:
    """The files `read_documents` reads under directory `root`, in the order it reads them."""
    return walk(Path(root), extensions, follow_symlinks=follow_symlinks, skipped=skipped)


def read_file(
    path: str | Path, rel: str, *, text_field: str = "text", text_split: TextSplit = "file",
    max_chars: int | None = None, errors: ErrorLog | None = None,
) -> Iterator[Document]:
    """The documents of one file, with ids under `rel`: what `read_documents` yields for it inside a directory."""
    errors = errors if errors is not None else ErrorLog()
    yield from _read_file(Path(path), rel, text_field, text_split, max_chars, errors)


def stdlib_root() -> Path:
    """The directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(include_tests: bool = True) -> list[Path]:
    """The standard library's .py files, sorted, without site-packages / dist-packages.

    With `include_tests=False`, files under any directory named `test` or `tests` are left out.
    """
    root = stdlib_root()
    files = []
    for path in walk(root, (".py",)):
        if not include_tests and _TEST_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        files.append(path)
    return files


def read_stdlib(include_tests: bool = True, errors: ErrorLog | None = None) -> Iterator[Document]:
    """The standard library as documents, with ids relative to its root (e.g. `json/decoder.py`)."""
    root = stdlib_root()
    errors = errors if errors is not None else ErrorLog()
    for path in stdlib_source_files(include_tests):
        doc = _read_text_file(path, path.relative_to(root).as_posix(), errors)
        if doc is not None:
            yield doc
