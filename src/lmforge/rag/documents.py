"""Documents for retrieval: the files under a folder, each read into structural blocks with their source spans.

A block is a paragraph, a heading's section start, a fenced code block, or a top-level code definition, with the
lines it spans (1-based, inclusive), the heading it sits under, and for PDFs its page. The readers:

- `.txt`, `.rst`: paragraphs (runs of non-blank lines);
- `.md`, `.markdown`: ATX headings (`# Title`) start sections; fenced code blocks stay whole; paragraphs;
- `.html`, `.htm`: the text of block elements (headings, paragraphs, list items, cells, `pre`), with the source
  lines the element spans, headed by the heading path; `script`, `style` and `template` are left out (stdlib
  `html.parser`);
- `.pdf`: each page's text layer (lmforge.data.pdf, PDFium), in paragraphs; lines count within the page;
- code (`lmforge.data.files.CODE_SUFFIXES`): Python by top-level `def`/`class` (with decorators, via `ast`), the
  statements between them as blocks of their own; other languages by blank-line-separated stretches, headed by
  their first line.

For line-based formats (all but HTML) `Document.lines` keeps the file's lines, so a chunk's text is exactly its
line range. The folder is walked with lmforge.data.files.walk: links resolving outside it are never followed;
those, binary files (a NUL byte) and files that are not UTF-8 are skipped and counted by reason in an ErrorLog.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from lmforge.data.base_reader import ErrorLog
from lmforge.data.files import CODE_SUFFIXES, walk

TEXT_SUFFIXES = frozenset({".txt", ".rst"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
SUFFIXES = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | HTML_SUFFIXES | {".pdf"} | CODE_SUFFIXES
BINARY = "binary file (NUL byte)"
NOT_UTF8 = "not UTF-8"
UNREADABLE = "unreadable file"
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass
class Block:
    """A structural unit: its text, its lines (1-based, inclusive; within the page for a PDF), its heading."""

    text: str
    start_line: int
    end_line: int
    heading: str | None = None
    page: int | None = None


@dataclass
class Document:
    """One file (`file` is its path relative to the folder, POSIX) as blocks; `lines` are the source lines of a
    line-based format (per page for a PDF: `pages[page - 1]`), None for HTML."""

    file: str
    blocks: list[Block]
    lines: list[str] | None = None
    pages: list[list[str]] = field(default_factory=list)

    def span_text(self, start_line: int, end_line: int, page: int | None = None) -> str | None:
        """The source lines start..end (of `page`), or None when the format keeps no lines."""
        lines = self.pages[page - 1] if page is not None else self.lines
        return None if lines is None else "\n".join(lines[start_line - 1 : end_line])


def paragraphs(lines: list[str], heading: str | None = None, first: int = 1, page: int | None = None) -> list[Block]:
    """Runs of non-blank lines of `lines` (numbered from `first`) as blocks."""
    blocks, start = [], None
    for i, line in enumerate([*lines, ""]):
        if line.strip() and start is None:
            start = i
        elif not line.strip() and start is not None:
            blocks.append(Block("\n".join(lines[start:i]), first + start, first + i - 1, heading, page))
            start = None
    return blocks


def markdown_blocks(lines: list[str]) -> list[Block]:
    """Headings (each a block, and the heading of what follows: the path of its parents, ' > '-joined), fenced code
    blocks kept whole, and paragraphs."""
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []
    heading: str | None = None
    i = 0
    while i < len(lines):
        m = _HEADING.match(lines[i])
        if m:
            level = len(m.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2))]
            heading = " > ".join(t for _, t in path)
            blocks.append(Block(lines[i], i + 1, i + 1, heading))
            i += 1
        elif _FENCE.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if _FENCE.match(lines[j])), len(lines) - 1)
            blocks.append(Block("\n".join(lines[i : end + 1]), i + 1, end + 1, heading))
            i = end + 1
        elif lines[i].strip():
            end = i
            while end + 1 < len(lines) and lines[end + 1].strip() and not _HEADING.match(lines[end + 1]) \
                    and not _FENCE.match(lines[end + 1]):  # fmt: skip
                end += 1
            blocks.append(Block("\n".join(lines[i : end + 1]), i + 1, end + 1, heading))
            i = end + 1
        else:
            i += 1
    return blocks


def python_blocks(lines: list[str], source: str) -> list[Block]:
    """Top-level definitions (decorators included), each headed `def name` / `class name`; the statements between
    them in paragraphs. A file that does not parse falls back to `code_blocks`."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return code_blocks(lines)
    blocks: list[Block] = []
    done = 0  # lines before this index are covered
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        end = node.end_lineno or node.lineno
        blocks += paragraphs(lines[done : start - 1], None, done + 1)
        kind = "class" if isinstance(node, ast.ClassDef) else "def"
        blocks.append(Block("\n".join(lines[start - 1 : end]), start, end, f"{kind} {node.name}"))
        done = end
    return blocks + paragraphs(lines[done:], None, done + 1)


def code_blocks(lines: list[str]) -> list[Block]:
    """Blank-line-separated stretches of code, each headed by its first line."""
    return [Block(b.text, b.start_line, b.end_line, b.text.splitlines()[0].strip()[:80]) for b in paragraphs(lines)]


class _HtmlText(HTMLParser):
    """The text of block elements with the source lines they span; a heading heads what follows it, with the
    headings above it (`Install > Linux`)."""

    BLOCKS = frozenset({"p", "li", "pre", "td", "th", "dt", "dd", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6",
                        "div", "section", "article", "caption", "figcaption", "title"})  # fmt: skip
    HIDDEN = frozenset({"script", "style", "template", "noscript"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.heading: str | None = None
        self._path: list[tuple[int, str]] = []  # (level, title) of the headings above, as markdown_blocks keeps
        self._text: list[str] = []
        self._start = 1
        self._hidden = 0

    def _flush(self, tag: str | None = None) -> None:
        text = re.sub(r"[ \t\r\f\v]+", " ", "".join(self._text)).strip()
        text = "\n".join(line.strip() for line in text.splitlines() if line.strip())
        if text:
            if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
                level = int(tag[1])
                self._path = [(lv, t) for lv, t in self._path if lv < level] + [(level, " ".join(text.split()))]
                self.heading = " > ".join(t for _, t in self._path)
            self.blocks.append(Block(text, self._start, max(self.getpos()[0], self._start), self.heading))
        self._text = []
        self._start = self.getpos()[0]

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self._hidden += 1
        elif tag == "br":
            self._text.append("\n")
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.BLOCKS:
            self._flush(tag)

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            if not "".join(self._text).strip():  # the line the text itself starts on, past leading newlines
                self._start = self.getpos()[0] + data[: len(data) - len(data.lstrip())].count("\n")
            self._text.append(data)


def html_blocks(source: str) -> list[Block]:
    parser = _HtmlText()
    parser.feed(source)
    parser.close()
    parser._flush()
    return parser.blocks


def _decode(path: Path, errors: ErrorLog, rel: str) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        errors.add(UNREADABLE, rel)
        return None
    if b"\0" in data[:8192]:
        errors.add(BINARY, rel)
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        errors.add(NOT_UTF8, rel, data[: e.start].count(b"\n") + 1)
        return None


def _read_pdf(path: Path, rel: str, errors: ErrorLog) -> Document:
    from lmforge.data.pdf import read_pdf  # PDFium, imported only when a PDF is read

    pages: list[list[str]] = []
    blocks: list[Block] = []
    for doc in read_pdf(path, rel, errors):
        number = int(doc.meta["page"])
        while len(pages) < number:
            pages.append([])
        pages[number - 1] = doc.text.splitlines()
        blocks += paragraphs(pages[number - 1], None, 1, number)
    return Document(rel, blocks, None, pages)


def read_document(path: Path, rel: str, errors: ErrorLog) -> Document | None:
    """The blocks of one file, or None (counted in `errors`) when it cannot be read as text."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _read_pdf(path, rel, errors)
    source = _decode(path, errors, rel)
    if source is None:
        return None
    if suffix in HTML_SUFFIXES:
        return Document(rel, html_blocks(source))
    lines = source.splitlines()
    if suffix in MARKDOWN_SUFFIXES:
        blocks = markdown_blocks(lines)
    elif suffix == ".py":
        blocks = python_blocks(lines, source)
    elif suffix in CODE_SUFFIXES:
        blocks = code_blocks(lines)
    else:
        blocks = paragraphs(lines)
    return Document(rel, blocks, lines)


def source_files(folder: Path, errors: ErrorLog) -> list[tuple[Path, str]]:
    """(path, path relative to `folder`) of every readable-format file inside it; links pointing out of it, and
    files of other formats, are counted in `errors` and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder; give the folder of documents to index")
    return [(p, p.relative_to(folder).as_posix()) for p in walk(folder, SUFFIXES, skipped=errors)]


def read_folder(folder: Path, errors: ErrorLog) -> Iterator[Document]:
    """Every document under `folder` (see `source_files`), in path order."""
    for path, rel in source_files(folder, errors):
        doc = read_document(path, rel, errors)
        if doc is not None:
            yield doc
