"""Web sources for curation: WARC / WET archives, HTML pages, and datasets saved by Hugging Face `datasets`.

- A WARC file (`.warc`, `.warc.gz`; read by `fastwarc`, which decompresses natively): each HTTP `response` record
  whose Content-Type is HTML becomes one document through main-content extraction; each `conversion` record of a
  WET file (Common Crawl's extracted text) becomes one document as it is. Other record types (warcinfo, request,
  metadata, resource, revisit) are not documents and not errors. A document's id is `rel:N`, N the 1-based position
  of its record in the file (warcinfo is 1); its meta holds the record's `url`, `date` and `record_id`.
- An HTML file (`.html`, `.htm`, compressed or not): one document, main content only, id as for a text file.
- A directory written by `Dataset.save_to_disk` (`state.json` beside `.arrow` files) or `DatasetDict.save_to_disk`
  (`dataset_dict.json`, one subdirectory per split): one document per row, id `split:row` (row 1-based; a single
  Dataset uses its directory name as the split). The arrow files are read batch by batch with pyarrow, so the
  `datasets` package is not needed to read them.

`fastwarc` and `resiliparse` are imported when the first web file is read, so the other readers work without them.
Bad records are counted in the `ErrorLog` like every other reader's; WARC errors name the record's position.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data.files import COMPRESSED_SUFFIXES
from lmforge.data.base_reader import Document, ErrorLog, _checked_text, _chunks, _CorruptCompressed

log = logging.getLogger(__name__)

_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# When no encoding reads a page cleanly, a lenient decode that replaces at most this share of its characters is a
# readable page with a few stray bytes; above it, the encoding is wrong and the text is mojibake.
_MAX_REPLACED = 0.01
_GZIP_MEMBER_START = b"\x1f\x8b\x08"
_CHUNK_BYTES = 1 << 16


def _require(module: str, package: str, path: Path) -> Any:
    """Import an optional dependency, or say which package reading `path` needs."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"reading {path} needs {package}, which is not installed: pip install {package}") from e


# --- decoding and main-content extraction -------------------------------------------------------------------------


def decode_html(body: bytes, declared: str | None = None) -> str | None:
    """The page's text, or None when no candidate encoding reads it without too many replacement characters.

    UTF-8 is tried first because it validates itself: bytes in another encoding almost never form valid UTF-8,
    while a UTF-8 page served with a stale default `charset=ISO-8859-1` is the web's most common mislabel. Then the
    declared charset (HTTP header), then the `<meta charset>` tag or, without one, uchardet's guess.
    """
    from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5

    if body.startswith(codecs.BOM_UTF8):
        body = body[len(codecs.BOM_UTF8) :]
    candidates = ["utf-8"]
    if declared:
        # The WHATWG table maps labels to what browsers really use (ISO-8859-1 -> windows-1252, gb2312 -> gbk).
        mapped = map_encoding_to_html5(declared, fallback_utf8=False)
        if mapped:
            candidates.append(mapped)
    candidates.append(detect_encoding(body, from_html_meta=True))
    for encoding in dict.fromkeys(candidates):
        try:
            return body.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
    best = candidates[1] if len(candidates) > 1 else "utf-8"
    try:
        text = body.decode(best, errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    return text if text.count("\ufffd") <= _MAX_REPLACED * len(text) else None


def extract_main_text(html: str) -> str:
    """The main content of an HTML page as plain text, one blank line between paragraphs."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    # preserve_formatting keeps block boundaries as line breaks, so paragraphs stay paragraphs. main_content drops
    # navigation, headers, footers and sidebars. Image alt texts ("logo", "photo by ...") are captions, not prose;
    # form fields, <noscript> ("please enable JavaScript") and links are chrome. Reader comments are not the page's
    # content and are its spammiest part; bylines, dates and share counters (post_meta) are boilerplate. On the
    # article-extraction benchmark (benchmarks/html_extraction.py) resiliparse's defaults with main_content score
    # token F1 0.898; leaving out alt texts, comments and post meta raises precision from 0.84 to 0.90 at the same
    # recall (0.99), F1 0.937. List bullets are kept: they mark where one list item ends and the next begins.
    return extract_plain_text(
        HTMLTree.parse(html),
        preserve_formatting=True,
        main_content=True,
        list_bullets=True,
        alt_texts=False,
        links=False,
        form_fields=False,
        noscript=False,
        comments=False,
        post_meta=False,
    ).strip()


def _html_document(
    body: bytes, declared: str | None, path: Path, doc_id: str, errors: ErrorLog, where: int | None
) -> Document | None:
    from resiliparse.parse.html import HTMLParserException

    html = decode_html(body, declared)
    if html is None:
        errors.add("undecodable", path, where)
        return None
    try:
        text = extract_main_text(html)
    except HTMLParserException:
        errors.add("unparsable html", path, where)
        return None
    if not text:
        errors.add("empty", path, where)
        return None
    return Document(id=doc_id, text=text, source=str(path))


def read_html(path: Path, rel: str, errors: ErrorLog) -> Iterator[Document]:
    """One HTML file (possibly .gz / .zst) as one document of its main content."""
    _require("resiliparse", "resiliparse", path)
    doc = _html_document(b"".join(_chunks(path)), None, path, rel, errors, None)
    if doc is not None:
        yield doc


# --- WARC / WET ---------------------------------------------------------------------------------------------------


def _http_body(record: Any, raw: bytes) -> bytes:
    """Undo chunked transfer and gzip / deflate / br content encodings, as crawlers like wget store them verbatim.

    Common Crawl stores bodies already decoded (the original header renamed), so its records pass through untouched.
    """
    from fastwarc.stream_io import BrotliReader, ChunkedReader, GzipReader

    headers = record.http_headers
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        raw = ChunkedReader(io.BytesIO(raw)).read()
    for coding in reversed([c.strip().lower() for c in (headers.get("Content-Encoding") or "").split(",")]):
        if coding in ("gzip", "x-gzip"):
            raw = GzipReader(io.BytesIO(raw)).read()
        elif coding == "deflate":
            raw = GzipReader(io.BytesIO(raw), zlib=True).read()
        elif coding == "br":
            raw = BrotliReader(io.BytesIO(raw)).read()
    return raw


def _url(record: Any) -> str | None:
    url = record.headers.get("WARC-Target-URI")
    # WARC 1.0 wrote the URI in angle brackets (wget still does); 1.1 dropped them.
    return url.strip("<>") if url else None


def _meta(record: Any) -> dict[str, Any]:
    meta = {"url": _url(record), "date": record.headers.get("WARC-Date"), "record_id": record.record_id}
    language = record.headers.get("WARC-Identified-Content-Language")
    if language:
        meta["language"] = language
    return meta


def _gzip_tail_complete(path: Path, offset: int) -> bool:
    """Whether the gzip members from `offset` to the end of the file all end with their trailer.

    fastwarc stops without a word at a truncated gzip member, so the end of the file is checked here. A WARC
    written one gzip member per record has the last record's member at `offset`, and only that tail is read;
    otherwise (one member for the whole file) the whole file is.
    """
    with open(path, "rb") as raw:
        raw.seek(offset)
        if raw.read(len(_GZIP_MEMBER_START)) != _GZIP_MEMBER_START:
            offset = 0
        raw.seek(offset)
        try:
            with gzip.GzipFile(fileobj=raw) as f:
                while f.read1(_CHUNK_BYTES):
                    pass
        except (OSError, EOFError, zlib.error):
            return False
    return True


class _CorruptWarc(Exception):
    """The archive ends inside a record or holds bytes fastwarc cannot read as WARC."""


def _response_rejection(record: Any) -> str | None:
    """Why an HTTP response record is no document (parsing its HTTP headers on the way), or None if it is one."""
    if not record.is_http:  # a crawler's DNS lookup, say
        return "not http"
    try:
        record.parse_http()  # raw: decoding here would hide a truncated body from the length check
    except OSError:
        return "bad http headers"
    status = record.http_headers.status_code
    if status != 200:
        # Redirects, errors and partial content carry a server's boilerplate page, not the resource.
        return f"http status {status}"
    if (record.http_content_type or "").lower() not in _HTML_TYPES:
        return "not html"
    return None


def _warc_document(record: Any, raw: bytes, path: Path, doc_id: str, errors: ErrorLog, index: int) -> Document | None:
    from fastwarc.warc import WarcRecordType

    if record.record_type == WarcRecordType.conversion:
        try:
            text = _checked_text(raw.decode("utf-8"), path, index, errors)  # Common Crawl writes WET as UTF-8
        except UnicodeDecodeError:
            errors.add("not utf-8", path, index)
            return None
        return None if text is None else Document(id=doc_id, text=text, source=str(path), meta=_meta(record))
    try:
        body = _http_body(record, raw)
    except OSError:
        errors.add("bad http encoding", path, index)
        return None
    doc = _html_document(body, record.http_charset, path, doc_id, errors, index)
    if doc is not None:
        doc.meta = _meta(record)
    return doc


def _warc_documents(path: Path, rel: str, errors: ErrorLog) -> Iterator[Document]:
    fastwarc = _require("fastwarc.warc", "fastwarc", path)
    _require("resiliparse", "resiliparse", path)
    response, conversion = fastwarc.WarcRecordType.response, fastwarc.WarcRecordType.conversion
    not_documents: Counter[str] = Counter()
    index, last_pos, docs = 0, 0, 0
    try:
        # fsspec_args=False: fastwarc opens the local file itself rather than through fsspec, which is slower.
        for record in fastwarc.ArchiveIterator(str(path), parse_http=False, fsspec_args=False):
            index += 1
            last_pos = record.stream_pos
            kind = record.record_type
            # None: a document; "": not a document and not an error (warcinfo, request, metadata, ...).
            reason = _response_rejection(record) if kind == response else None if kind == conversion else ""
            expected = record.content_length
            if reason is None:
                raw = record.reader.read()
                got = len(raw)
            else:
                got = record.reader.consume()  # read, not skipped, so that a truncated last record is noticed
            if got < expected:
                raise _CorruptWarc(f"record {index} ends after {got} of its {expected} bytes")
            if reason == "":
                not_documents[str(kind)] += 1
            elif reason is not None:
                errors.add(reason, path, index)
            else:
                doc = _warc_document(record, raw, path, f"{rel}:{index}", errors, index)
                if doc is not None:
                    docs += 1
                    yield doc
    except OSError as e:  # fastwarc reports bad compressed data and unparsable WARC headers alike as OSError
        raise _CorruptWarc(str(e)) from e
    if path.suffix.lower() == ".gz" and not _gzip_tail_complete(path, last_pos):
        raise _CorruptWarc("the gzip stream ends inside a member")
    log.debug("%s: %d records, %d documents; not documents: %s", path, index, docs, dict(not_documents))


def read_warc(path: Path, rel: str, errors: ErrorLog) -> Iterator[Document]:
    """The documents of one WARC or WET file (see the module docstring).

    Damage ends the file but keeps the documents read before it: a compressed file raises `_CorruptCompressed` for
    the caller to count, as the other readers do; an uncompressed one counts "corrupt warc file" here.
    """
    try:
        yield from _warc_documents(path, rel, errors)
    except _CorruptWarc as e:
        if path.suffix.lower() in COMPRESSED_SUFFIXES:
            raise _CorruptCompressed(str(e)) from e
        log.warning("%s: corrupt warc file (%s); kept the documents read before it", path, e)
        errors.add("corrupt warc file", path)


# --- datasets saved by Hugging Face `datasets` --------------------------------------------------------------------


def is_hf_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    if (path / "dataset_dict.json").is_file():
        return True
    return (path / "state.json").is_file() and any(path.glob("*.arrow"))


def _hf_splits(root: Path, split: str | None) -> list[tuple[str, Path]]:
    """(name, directory) of the splits to read, in the order `dataset_dict.json` lists them."""
    dict_file = root / "dataset_dict.json"
    if not dict_file.is_file():
        if split is not None:
            raise ValueError(f"{root} is a single saved Dataset, which has no splits; unset data.hf_split")
        return [(root.name, root)]
    names = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
    if split is None:
        return [(name, root / name) for name in names]
    if split not in names:
        raise ValueError(f"{root}: no split '{split}' (data.hf_split); splits present: {names}")
    return [(split, root / split)]


def _arrow_files(split_dir: Path) -> list[Path]:
    """The split's data files in row order: as listed in `state.json`, else sorted by name."""
    state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
    listed = [split_dir / entry["filename"] for entry in state.get("_data_files", [])]
    return listed or sorted(split_dir.glob("*.arrow"))


def _arrow_columns(path: Path) -> list[str] | None:
    """The columns of an arrow stream file, or None when it cannot be opened (reading it will count that)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).schema.names
    except (OSError, pa.ArrowInvalid):
        return None


def read_hf_dataset(root: Path, text_field: str, errors: ErrorLog, split: str | None = None) -> Iterator[Document]:
    """The rows of a saved Dataset or DatasetDict (all splits, or only `split`), one document each."""
    pa = _require("pyarrow", "pyarrow", root)
    splits = [(name, directory, _arrow_files(directory)) for name, directory in _hf_splits(root, split)]
    # Every split is checked before the first document, so a wrong text_field fails at once, not after a split.
    for _, directory, files in splits:
        if files:
            columns = _arrow_columns(files[0])
            if columns is not None and text_field not in columns:
                raise ValueError(
                    f"{directory}: dataset has no column '{text_field}' (data.text_field); columns present: "
                    f"{sorted(columns)}. Set data.text_field to the column that holds the text."
                )
    for name, directory, files in splits:
        row = 0
        for file in files:
            try:
                # Memory-mapped and read one record batch at a time: memory stays bounded by the largest batch.
                with pa.memory_map(str(file)) as source:
                    for batch in pa.ipc.open_stream(source):
                        for value in batch.column(text_field).to_pylist():
                            row += 1
                            text = _checked_text(value, directory, row, errors)
                            if text is not None:
                                yield Document(id=f"{name}:{row}", text=text, source=str(directory))
            except (OSError, pa.ArrowInvalid) as e:
                # The split ends here: numbering the next file's rows on from a damaged one would give them ids
                # that belong to other rows.
                log.warning("%s: unreadable arrow file (%s); kept the rows read before it", file, e)
                errors.add("corrupt arrow file", file)
                break
