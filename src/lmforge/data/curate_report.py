"""What curation did, for people: histograms of document signals before and after, and a terminal summary table.

`SignalHistograms` counts, for every document it is shown, a handful of cheap signals (length in characters and
words, mean word length, the fraction of lines ending in terminal punctuation, of alphabetic characters, of
duplicate lines, of non-ASCII characters) into bins fixed in advance. Fixed bins make histograms from different
worker processes mergeable by adding counts, and make them comparable across runs. `plot_histograms` draws a
before / after pair as one PNG; `summary_table` turns a curation stats dict (the `stats.json` layout) into a
fixed-width table.

This module works from plain dicts and strings only, so it does not depend on how curation is organised.
"""

from __future__ import annotations

import re
import sys
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Literal

from lmforge.io import atomic_open

# -- signals -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalSpec:
    """One signal's fixed bins.

    With `n` edges there are `n + 1` bins: bin 0 holds values below `edges[0]`, bin `i` holds
    `edges[i-1] <= value < edges[i]`, and bin `n` holds values at or above `edges[-1]`.
    """

    name: str
    label: str
    scale: Literal["log", "linear"]
    edges: tuple[float, ...]

    def bin_of(self, value: float) -> int:
        return bisect_right(self.edges, value)

    def bin_range(self, index: int) -> tuple[float, float]:
        """The half-open value range `[low, high)` of bin `index` (infinite at the two ends)."""
        low = self.edges[index - 1] if index > 0 else float("-inf")
        high = self.edges[index] if index < len(self.edges) else float("inf")
        return low, high


def _log_edges(decades: int, per_decade: int = 5) -> tuple[float, ...]:
    return tuple(10 ** (k / per_decade) for k in range(decades * per_decade + 1))


_FRACTION_EDGES = tuple(k / 20 for k in range(1, 21))  # [0, .05), [.05, .10), ..., [.95, 1), and exactly 1

# The order here is the order of `to_dict`, of `document_signals` and of the plot's panels.
SIGNALS: tuple[SignalSpec, ...] = (
    # Bin 0 (below 1) holds empty documents; the last bin 10^7 characters and more.
    SignalSpec("chars", "characters", "log", _log_edges(7)),
    SignalSpec("words", "words (whitespace-separated)", "log", _log_edges(6)),
    # Bin 0 (below 1) holds documents without words.
    SignalSpec("mean_word_length", "mean word length (characters)", "linear", tuple(k / 2 for k in range(2, 31))),
    SignalSpec("terminal_punct_frac", "fraction of lines ending in . ! ? or a closing quote", "linear",
               _FRACTION_EDGES),  # fmt: skip
    SignalSpec("alpha_frac", "fraction of non-space characters alphabetic", "linear", _FRACTION_EDGES),
    SignalSpec("dup_line_frac", "fraction of lines repeating an earlier line", "linear", _FRACTION_EDGES),
    SignalSpec("non_ascii_frac", "fraction of characters non-ASCII", "linear", _FRACTION_EDGES),
)
SIGNAL_NAMES: tuple[str, ...] = tuple(s.name for s in SIGNALS)
_EDGES = tuple(s.edges for s in SIGNALS)

# What a line may end with to count as ending a sentence (after trailing whitespace is stripped).
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u2026", "\u3002", "\uff01", "\uff1f")

# The characters above U+007F for which str.isspace() is true (a test checks this list against Python's).
_UNICODE_SPACES = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


def _table(keep: Iterable[int]) -> bytes:
    keep = set(keep)
    return bytes(b for b in range(256) if b not in keep)


_ASCII_SPACE_BYTES = [b for b in range(128) if chr(b).isspace()]
_ASCII_ALPHA_BYTES = [b for b in range(128) if chr(b).isalpha()]
# Deleting these from UTF-8 bytes leaves only the ASCII whitespace, the ASCII letters, or the non-ASCII bytes.
_DELETE_ALL_BUT_SPACE = _table(_ASCII_SPACE_BYTES)
_DELETE_ALL_BUT_ALPHA = _table(_ASCII_ALPHA_BYTES)
_DELETE_ASCII = bytes(range(128))
# Maps each byte to b" " (ASCII whitespace) or b"x" (anything else), so word starts are the b" x" pairs.
_SPACE_OR_NOT = bytes(32 if b in _ASCII_SPACE_BYTES else 120 for b in range(256))


def _signals(text: str) -> tuple[float, ...]:
    """The signals of `text`, in `SIGNALS` order.

    A few C-level passes over the text (its lines, and its UTF-8 bytes translated through fixed tables), with no
    Python-level step per character except over the non-ASCII characters of text that has non-letters among them.
    Words are what `str.split()` returns, lines what `str.splitlines()` returns with blank lines dropped and
    surrounding whitespace stripped, characters are code points. A ratio with a zero denominator is 0.
    """
    n = len(text)
    lines = list(filter(None, map(str.strip, text.splitlines())))
    n_lines = len(lines)
    if n_lines:
        terminal = sum(map(str.endswith, lines, repeat(TERMINAL_PUNCTUATION))) / n_lines
        duplicate = (n_lines - len(set(lines))) / n_lines
    else:
        terminal = duplicate = 0.0

    data = text.encode("utf-8", "surrogatepass")  # surrogatepass: a lone surrogate from JSON must not raise
    non_ascii = alpha = 0
    if not text.isascii():  # O(1) for str
        others = data.translate(None, _DELETE_ASCII).decode("utf-8", "surrogatepass")
        non_ascii = len(others)
        # A Python-level step per non-ASCII character only when some are not letters: cheap for Western text
        # (a few quotes and dashes), the slow case for CJK text with its full-width punctuation.
        alpha = non_ascii if others.isalpha() else sum(map(str.isalpha, others))
        # Non-ASCII whitespace separates words too: turn it into plain spaces (same code point count) before
        # the byte-level counts below. Rare in practice, so most documents skip this.
        spaces_found = set(_UNICODE_SPACES.findall(others))
        if spaces_found:
            for space in spaces_found:
                text = text.replace(space, " ")
            data = text.encode("utf-8", "surrogatepass")
    spaces = len(data.translate(None, _DELETE_ALL_BUT_SPACE))
    alpha += len(data.translate(None, _DELETE_ALL_BUT_ALPHA))
    marks = data.translate(_SPACE_OR_NOT)
    words = marks.count(b" x") + (marks[:1] == b"x")
    non_space = n - spaces
    return (
        n,
        words,
        non_space / words if words else 0.0,
        terminal,
        alpha / non_space if non_space else 0.0,
        duplicate,
        non_ascii / n if n else 0.0,
    )


def document_signals(text: str) -> dict[str, float]:
    """The signals `SignalHistograms.add` bins for `text`, by name."""
    return dict(zip(SIGNAL_NAMES, _signals(text)))


class SignalHistograms:
    """Fixed-bin histograms of per-document signals (see `SIGNALS`); merge across processes by adding counts."""

    VERSION = 1

    def __init__(self) -> None:
        self.total = 0
        self._counts: list[list[int]] = [[0] * (len(s.edges) + 1) for s in SIGNALS]

    def add(self, text: str) -> None:
        """Count one document."""
        self.total += 1
        for counts, edges, value in zip(self._counts, _EDGES, _signals(text)):
            counts[bisect_right(edges, value)] += 1

    def add_many(self, texts: Iterable[str]) -> SignalHistograms:
        for text in texts:
            self.add(text)
        return self

    def merge(self, other: SignalHistograms) -> SignalHistograms:
        """Add `other`'s counts into this histogram (in place); returns self."""
        if not isinstance(other, SignalHistograms):
            raise TypeError(f"can only merge a SignalHistograms, not {type(other).__name__}")
        self.total += other.total
        for mine, theirs in zip(self._counts, other._counts):
            for i, c in enumerate(theirs):
                mine[i] += c
        return self

    def counts(self, name: str) -> list[int]:
        """A copy of the bin counts of signal `name` (`len(spec.edges) + 1` bins)."""
        return list(self._counts[SIGNAL_NAMES.index(name)])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; keys always in the same order, edges included so a reader can check them."""
        return {
            "version": self.VERSION,
            "total": self.total,
            "signals": {
                spec.name: {"scale": spec.scale, "edges": list(spec.edges), "counts": list(counts)}
                for spec, counts in zip(SIGNALS, self._counts)
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SignalHistograms:
        """The histograms `to_dict` wrote. Raises ValueError if the bins differ from this version's."""
        if d.get("version") != cls.VERSION:
            raise ValueError(f"signal histograms version {d.get('version')!r}, expected {cls.VERSION}")
        signals = d.get("signals", {})
        if set(signals) != set(SIGNAL_NAMES):
            raise ValueError(f"signal histograms have signals {sorted(signals)}, expected {sorted(SIGNAL_NAMES)}")
        h = cls()
        h.total = int(d["total"])
        for i, spec in enumerate(SIGNALS):
            entry = signals[spec.name]
            if [float(e) for e in entry["edges"]] != list(spec.edges):
                raise ValueError(f"signal {spec.name!r} was binned with different edges; cannot load or merge it")
            counts = [int(c) for c in entry["counts"]]
            if len(counts) != len(spec.edges) + 1 or sum(counts) != h.total or min(counts) < 0:
                raise ValueError(f"signal {spec.name!r}: counts do not match the edges or the total {h.total}")
            h._counts[i] = counts
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignalHistograms):
            return NotImplemented
        return self.total == other.total and self._counts == other._counts

    def __repr__(self) -> str:
        return f"SignalHistograms(total={self.total})"


# -- plot ----------------------------------------------------------------------------------------------------------


def _plot_edges(spec: SignalSpec) -> list[float]:
    """Finite drawing edges for every bin: the open-ended first and last bins get one more step of the scale."""
    e = list(spec.edges)
    if spec.scale == "log":
        ratio = e[1] / e[0]
        return [e[0] / ratio, *e, e[-1] * ratio]
    step = e[1] - e[0]
    return [e[0] - step, *e, e[-1] + step]


def plot_histograms(before: SignalHistograms, after: SignalHistograms, path: Path) -> Path:
    """Write one PNG to `path`: a panel per signal, the documents before and after curation overlaid.

    Lengths use a log x axis. The first and last bins are open-ended (below the first edge, at or above the last)
    and are drawn one step wide: for the length panels the first bin is the empty documents.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    cols = 4
    rows = -(-len(SIGNALS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), dpi=110, squeeze=False)
    flat = axes.ravel()
    for ax, spec in zip(flat, SIGNALS):
        edges = _plot_edges(spec)
        for hist, label, style in (
            (before, f"before ({before.total:,} docs)", {"color": "0.55", "lw": 1.0, "alpha": 0.35, "fill": True}),
            (after, f"after ({after.total:,} docs)", {"color": "C0", "lw": 1.6, "fill": False}),
        ):
            counts = hist.counts(spec.name)
            ax.stairs(counts, edges, label=label, **style)
        if spec.scale == "log":
            ax.set_xscale("log")
        ax.set_xlabel(spec.label, fontsize=8)
        ax.set_ylabel("documents", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in flat[len(SIGNALS):]:
        ax.axis("off")
    handles, labels = flat[0].get_legend_handles_labels()
    if len(flat) > len(SIGNALS):
        flat[-1].legend(handles, labels, loc="center", frameon=False)
    else:
        flat[0].legend(fontsize=7)
    fig.suptitle(f"Document signals before curation ({before.total:,} docs) and after ({after.total:,} docs)")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


# -- summary table -------------------------------------------------------------------------------------------------

_BYTE_UNITS = ("kB", "MB", "GB", "TB", "PB")


def human_bytes(n: int | float) -> str:
    """Decimal units with one decimal place: 999 B, 1.0 kB, 12.3 MB."""
    n = int(n)
    if abs(n) < 1000:
        return f"{n} B"
    value = float(n)
    for unit in _BYTE_UNITS:
        value /= 1000
        if abs(value) < 999.95 or unit == _BYTE_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_percent(part: int | float, whole: int | float) -> str:
    """`part / whole` as a percentage with one decimal; never rounds a non-zero share to 0.0% or a partial to 100%."""
    if not whole:
        return "—"
    p = 100 * part / whole
    if 0 < p < 0.05:
        return "<0.1%"
    if 99.95 <= p < 100:
        return ">99.9%"
    return f"{p:.1f}%"


def _int(value: Any) -> int:
    return int(value or 0)


def summary_table(stats: Mapping[str, Any]) -> str:
    """A fixed-width table of a curation stats dict (the `stats.json` layout); missing sections are left out.

    Rows: documents and bytes read; each removal reason (most documents first) with its share of the input; kept;
    documents modified in place per reason with the bytes taken out; the train / val splits; bad records and
    files skipped per reason. Notes follow when the counts do not add up.
    """
    docs_in, bytes_in = _int(stats.get("docs_in")), _int(stats.get("bytes_in"))
    Row = tuple[str, str, str, str, str]
    rows: list[Row | None] = []  # None draws a rule

    def row(label: str, docs: int | None = None, nbytes: int | None = None) -> Row:
        return (
            label,
            "" if docs is None else f"{docs:,}",
            "" if docs is None else human_percent(docs, docs_in),
            "" if nbytes is None else human_bytes(nbytes),
            "" if nbytes is None else human_percent(nbytes, bytes_in),
        )

    rows.append(row("read", docs_in, bytes_in))
    removed: Mapping[str, Mapping[str, Any]] = stats.get("removed") or {}
    removed_docs = sum(_int(e.get("docs")) for e in removed.values())
    removed_bytes = sum(_int(e.get("bytes")) for e in removed.values())
    if removed:
        rows.append(row("removed"))
        for reason, entry in sorted(removed.items(), key=lambda kv: (-_int(kv[1].get("docs")), kv[0])):
            rows.append(row(f"  {reason}", _int(entry.get("docs")), _int(entry.get("bytes"))))
        rows.append(row("  all reasons", removed_docs, removed_bytes))
    rows.append(None)
    rows.append(row("kept", _int(stats.get("docs_kept")), _int(stats.get("bytes_kept"))))

    modified: Mapping[str, Mapping[str, Any]] = stats.get("modified") or {}
    if modified:
        rows.append(row("modified (bytes: removed)"))
        for reason, entry in sorted(modified.items(), key=lambda kv: (-_int(kv[1].get("docs")), kv[0])):
            taken = entry.get("bytes_removed", entry.get("bytes"))
            rows.append(row(f"  {reason}", _int(entry.get("docs")), None if taken is None else _int(taken)))

    splits: Mapping[str, Mapping[str, Any]] = stats.get("splits") or {}
    if splits:
        rows.append(row("splits"))
        for name in sorted(splits, key=lambda s: ({"train": 0, "val": 1}.get(s, 2), s)):
            rows.append(row(f"  {name}", _int(splits[name].get("docs")), _int(splits[name].get("bytes"))))

    for key, label in (("skipped_bad", "bad records skipped"), ("skipped_files", "files skipped")):
        skipped: Mapping[str, Any] = stats.get(key) or {}
        if skipped:
            rows.append(None)
            by_reason: Mapping[str, int] = skipped.get("by_reason") or {}
            total = _int(skipped.get("total", sum(by_reason.values())))
            rows.append((label, f"{total:,}", "", "", ""))
            for reason, n in sorted(by_reason.items(), key=lambda kv: (-_int(kv[1]), kv[0])):
                rows.append((f"  {reason}", f"{_int(n):,}", "", "", ""))

    header: Row = ("curation", "documents", "% of input", "bytes", "% of input")
    table = [header, *(r for r in rows if r is not None)]
    widths = [max(len(r[i]) for r in table) for i in range(5)]

    def fmt(r: Row) -> str:
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 5)]
        return "  ".join(cells).rstrip()

    rule = "-" * (sum(widths) + 2 * 4)
    lines = [fmt(header), rule]
    lines += [rule if r is None else fmt(r) for r in rows]

    notes = []
    docs_kept = _int(stats.get("docs_kept"))
    if removed and docs_kept + removed_docs != docs_in:
        notes.append(f"kept + removed = {docs_kept + removed_docs:,} documents, but {docs_in:,} were read")
    if splits and sum(_int(s.get("docs")) for s in splits.values()) != docs_kept:
        notes.append(f"the splits hold {sum(_int(s.get('docs')) for s in splits.values()):,} documents, "
                     f"but {docs_kept:,} were kept")  # fmt: skip
    if stats.get("split_adjustment"):
        notes.append(str(stats["split_adjustment"]))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def print_summary(stats: Mapping[str, Any], console: Any = None) -> None:
    """Print `summary_table(stats)`: through a rich `Console` when given one, else to stdout."""
    table = summary_table(stats)
    if console is None:
        sys.stdout.write(table + "\n")
    else:
        console.print(table, markup=False, highlight=False, soft_wrap=True)
