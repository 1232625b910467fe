"""What a curation run's counts ask its user to check, each time naming the setting that decides it.

`curation_warnings` turns a stats dict (the `stats.json` layout) into sentences: one per removal reason that took
more than `LARGE_SHARE` of the documents or of the bytes read (a code rule run on prose, a `max_chars` under the
size of the files), one for the files skipped for their extension, one for the links out of the source that were
not followed. `no_survivor_message` is the error of a run that kept nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.data.curate_report import human_percent
from lmforge.data.files import OUTSIDE

LARGE_SHARE = 0.2
# The setting behind each removal reason; an entry ending in a space matches a family ("gopher: word count").
_SETTINGS = (
    ("too short", "data.min_chars"),
    ("too long", "data.max_chars (or data.text_split: paragraph for text kept as one big file)"),
    ("long line", "data.max_line_chars, or data.code_rules (code_files: only code files are judged)"),
    ("low alnum fraction", "data.min_alnum_fraction, or data.code_rules"),
    ("generated", "data.code_rules"),
    ("duplicate", "data.dedup"),
    ("near duplicate", "data.near_dedup_threshold"),
    ("boilerplate only", "data.boilerplate_min_docs"),
    ("contaminated", "data.decontaminate"),
    ("language: ", "data.languages and data.language_min_confidence"),
    ("gopher: ", "data.quality"),
    ("c4: ", "data.quality"),
    ("fineweb: ", "data.quality"),
    ("toxicity: ", "data.toxicity_max_ratio"),
)
# A cap the user set on purpose: removing much is what it is for.
_EXPECTED = frozenset({"over max_docs"})
_EXTENSION_PREFIX, _EXTENSION_SUFFIX = "extension ", " not in data.extensions"


def setting_for(reason: str) -> str:
    """The setting that controls removal `reason`."""
    for prefix, setting in _SETTINGS:
        if reason == prefix or (prefix.endswith(" ") and reason.startswith(prefix)):
            return setting
    return "the data settings (docs/curation.md)"


def _counts(counts: Mapping[str, int]) -> str:
    """`a 3, b 1`: most first, or `none`."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{name} {n:,}" for name, n in items) or "none"


def _large_removals(stats: Mapping[str, Any]) -> list[str]:
    docs_in, bytes_in = stats.get("docs_in", 0), stats.get("bytes_in", 0)
    found = []
    for reason, entry in sorted((stats.get("removed") or {}).items(), key=lambda kv: (-kv[1]["docs"], kv[0])):
        docs, nbytes = entry["docs"], entry["bytes"]
        if reason in _EXPECTED or max(docs / max(docs_in, 1), nbytes / max(bytes_in, 1)) <= LARGE_SHARE:
            continue
        found.append(f"the rule '{reason}' removed {docs:,} of {docs_in:,} documents "
                     f"({human_percent(docs, docs_in)}) and {human_percent(nbytes, bytes_in)} of the bytes; "
                     f"if that is not intended, change {setting_for(reason)}")  # fmt: skip
    return found


def _skipped_files(stats: Mapping[str, Any], extensions: list[str]) -> list[str]:
    by_reason: Mapping[str, int] = (stats.get("skipped_files") or {}).get("by_reason") or {}
    found = []
    by_extension = {r[len(_EXTENSION_PREFIX) : -len(_EXTENSION_SUFFIX)]: n for r, n in by_reason.items()
                    if r.startswith(_EXTENSION_PREFIX) and r.endswith(_EXTENSION_SUFFIX)}  # fmt: skip
    if by_extension:
        n = sum(by_extension.values())
        found.append(f"{n:,} file{'s' if n != 1 else ''} skipped for their extension ({_counts(by_extension)}): "
                     f"data.extensions is {extensions}; add an extension there to read those files")  # fmt: skip
    if by_reason.get(OUTSIDE):
        n = by_reason[OUTSIDE]
        links = "symbolic links point" if n != 1 else "symbolic link points"
        found.append(f"{n:,} {links} outside the source and {'were' if n != 1 else 'was'} not read; "
                     f"data.follow_symlinks: true reads them")  # fmt: skip
    return found


def curation_warnings(stats: Mapping[str, Any], extensions: list[str]) -> list[str]:
    """The warnings a run with these counts deserves (module docstring); `extensions` is `data.extensions`."""
    return _large_removals(stats) + _skipped_files(stats, extensions)


def no_survivor_message(stats: Mapping[str, Any], source: str, stats_path: Path) -> str:
    """The error of a run that kept no document: what was read, removed and skipped, and the warnings."""
    removed = {reason: entry["docs"] for reason, entry in (stats.get("removed") or {}).items()}
    bad = (stats.get("skipped_bad") or {}).get("by_reason") or {}
    files = (stats.get("skipped_files") or {}).get("by_reason") or {}
    parts = [f"{stats.get('docs_in', 0):,} documents read", f"removed: {_counts(removed)}"]
    if bad:
        parts.append(f"bad records skipped: {_counts(bad)}")
    if files:
        parts.append(f"files skipped: {_counts(files)}")
    advice = "".join(f" {w[0].upper()}{w[1:]}." for w in stats.get("warnings") or ())
    return f"no document of {source!r} survived curation: {'; '.join(parts)}.{advice} See {stats_path}"
