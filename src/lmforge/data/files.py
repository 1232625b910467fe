"""Source files: which files under a source directory are read, why each of the others is not, and which are code.

A file is read when its extension is selected and it is a regular file (or a link to one) inside the source.
Every other entry is skipped and, when the caller passes a log, counted under one of these reasons with its path:

- `extension .X not in data.extensions` (`(none)` for a name without one): not selected by its name;
- `not a regular file`: a named pipe, a socket or a device, which would block or never end when read;
- `symlink outside source`: a link whose target resolves outside the source directory (a link to `/etc/shadow`
  must not put that file into a training set); `data.follow_symlinks: true` reads them;
- `symlink loop`: a link that resolves to itself, or to a directory the walk is already inside;
- `unreadable directory`: a directory that cannot be listed (no permission);
- `directory not entered (hidden or cache)`: `.git`, `.venv`, `__pycache__`, `site-packages`, `dist-packages`.

Links to directories inside the source are entered; a dangling link is returned like a file, so that its reader
counts it as an unreadable file. Files come back sorted by path, so two walks of one tree read the same order.

Code files are told by their extension (`CODE_SUFFIXES`): they stay one document each whatever their size, and the
code-only curation rules (long lines, generated-file notices, low alphanumeric share) look at them alone.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.data.base_reader import Document, ErrorLog

# Every format the readers know by its extension: what a directory source reads unless told otherwise.
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl", ".csv", ".parquet", ".warc", ".wet", ".html", ".htm",
                      ".pdf")
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
COMPRESSED_SUFFIXES = frozenset({".gz", ".zst"})
NOT_REGULAR = "not a regular file"
OUTSIDE = "symlink outside source"
LOOP = "symlink loop"
# Code files, by the comment syntax of their language (licence headers are comments), and together.
HASH_COMMENT_SUFFIXES = frozenset({".py", ".pyi", ".pyx", ".sh", ".bash", ".zsh", ".rb", ".pl", ".pm", ".r", ".jl",
                                   ".yaml", ".yml", ".toml", ".cmake"})  # fmt: skip
C_COMMENT_SUFFIXES = frozenset({".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".java", ".js", ".mjs", ".cjs",
                                ".ts", ".tsx", ".jsx", ".go", ".rs", ".cs", ".swift", ".kt", ".kts", ".scala",
                                ".dart", ".css", ".scss"})  # fmt: skip
CODE_SUFFIXES = HASH_COMMENT_SUFFIXES | C_COMMENT_SUFFIXES
_RECORD_LINE = re.compile(r":\d+$")  # the `:line` a record's or a paragraph's id ends with


def format_suffix(path: Path) -> str:
    """The suffix that names the file's format: `.jsonl` for both `a.jsonl` and `a.jsonl.gz`."""
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix in COMPRESSED_SUFFIXES else suffix


def document_suffix(doc: Document) -> str:
    """The format suffix of the file `doc` came from: of `meta["path"]` when its record names one, else of its id."""
    path = doc.meta.get("path")
    return format_suffix(Path(path if isinstance(path, str) else _RECORD_LINE.sub("", doc.id)))


def extension_reason(path: Path) -> str:
    """The skip reason of a file whose extension is not selected."""
    return f"extension {format_suffix(path) or '(none)'} not in data.extensions"


def _selected(path: Path, suffixes: set[str]) -> bool:
    return format_suffix(path) in suffixes or "".join(path.suffixes[-2:]).lower() in suffixes


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class _Walk:
    """One walk: the files found so far; each directory is listed with the real paths of those above it, so that a
    link back to one of them is a loop, not an endless descent."""

    def __init__(self, root: Path, extensions: Iterable[str], follow_symlinks: bool, skipped: ErrorLog | None):
        self.root = os.path.realpath(root)
        self.suffixes = {s.lower() for s in extensions}
        self.follow = follow_symlinks
        self.skipped = skipped
        self.files: list[Path] = []

    def skip(self, reason: str, path: Path) -> None:
        if self.skipped is not None:
            self.skipped.add(reason, path)

    def directory(self, path: Path, ancestors: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            self.skip("unreadable directory", path)
            return
        for entry in entries:
            child = path / entry.name
            if entry.is_symlink():
                self.link(child, ancestors)
            elif entry.is_dir(follow_symlinks=False):
                self.subdirectory(child, os.path.realpath(child), ancestors)
            elif not entry.is_file(follow_symlinks=False):  # what it is matters more than its name
                self.skip(NOT_REGULAR, child)
            elif not _selected(child, self.suffixes):
                self.skip(extension_reason(child), child)
            else:
                self.files.append(child)

    def subdirectory(self, path: Path, real: str, ancestors: frozenset[str]) -> None:
        if path.name in SKIP_DIRS or path.name.startswith("."):
            self.skip("directory not entered (hidden or cache)", path)
        else:
            self.directory(path, ancestors | {real})

    def link(self, path: Path, ancestors: frozenset[str]) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            if e.errno == errno.ELOOP:
                self.skip(LOOP, path)
            elif _selected(path, self.suffixes):
                self.files.append(path)  # dangling: its reader counts it as an unreadable file
            else:
                self.skip(extension_reason(path), path)
            return
        real = os.path.realpath(path)
        if stat.S_ISDIR(mode):
            if real in ancestors:
                self.skip(LOOP, path)
            elif not self.follow and not _inside(real, self.root):
                self.skip(OUTSIDE, path)
            else:
                self.subdirectory(path, real, ancestors)
        elif not self.follow and not _inside(real, self.root):
            self.skip(OUTSIDE, path)
        elif not stat.S_ISREG(mode):
            self.skip(NOT_REGULAR, path)
        elif not _selected(path, self.suffixes):
            self.skip(extension_reason(path), path)
        else:
            self.files.append(path)


def walk(
    root: Path, extensions: Iterable[str], *, follow_symlinks: bool = False, skipped: ErrorLog | None = None
) -> list[Path]:
    """The files under directory `root` to read, sorted by path; the others counted in `skipped` (module doc)."""
    w = _Walk(Path(root), extensions, follow_symlinks, skipped)
    w.directory(Path(root), frozenset({w.root}))
    return sorted(w.files)
