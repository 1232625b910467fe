"""Atomic writes: nothing half-written is ever visible under its final name.

Every helper writes to `<name>.tmp-<pid>` in the destination's own directory (so the final `os.replace` is a
rename within one filesystem), flushes and fsyncs it, then renames it over the destination. If the writer raises,
the temporary file is deleted and the destination is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal


def _temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries, so a rename into it survives a crash."""
    # The rename itself is only durable once the directory entry is flushed; not every OS allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: Literal["w", "wb"] = "w") -> Iterator[IO[Any]]:
    """Open `path` for writing through a temporary file that replaces `path` only if the block succeeds.

    Text mode writes UTF-8 with no newline translation, so the bytes on disk do not depend on the platform.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with open(tmp, mode, **text) as handle:
            yield handle


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, for writers that open files by name (a library's own writer): the file written
    there replaces `path` only if the block succeeds, and is removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash never leaves a short file in place
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON (keys in their given order, trailing newline) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty staging directory next to `dest`; on success it replaces `dest`, on failure it is removed."""
    dest = Path(dest)
    tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A directory cannot be renamed over a non-empty one, so the old version steps aside for the swap.
    old = dest.parent / f"{dest.name}.old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        if old.exists():
            old.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)
