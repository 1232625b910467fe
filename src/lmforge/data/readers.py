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
- a PDF file (`.pdf`): one document per page with text, id `path:page`, metadata `{"page": n, "pages": total}`;
  a PDF without a text layer (scanned), an encrypted or a corrupt one is counted as a bad record (`pdf.py`).
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

import itertools
import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

from lmforge.data.base_reader import (
    Document,
    ErrorLog,
    _checked_text,
    _chunks,
    _CorruptCompressed,
    _CorruptFile,
    _lines,
    _printable,
)
from lmforge.data.files import CODE_SUFFIXES, DEFAULT_EXTENSIONS, format_suffix, walk

log = logging.getLogger(__name__)

_TEST_DIRS = frozenset({"test", "tests"})
TextSplit = Literal["auto", "file", "paragraph"]
_TEXT_SPLITS = ("auto", "file", "paragraph")
# Deleting UTF-8 continuation bytes leaves one byte per character.
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


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
    elif suffix == ".pdf":
        from lmforge.data.pdf import read_pdf  # imports pypdfium2, needed only for PDF sources

        yield from read_pdf(path, rel, errors)
    elif suffix == ".wat":
        log.info("%s: skipped, a WAT file holds metadata, not text", path)
    else:
        yield from _read_text(path, rel, text_split, max_chars, errors)


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
