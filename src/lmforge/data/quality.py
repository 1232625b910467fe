"""Quality rules for web text: the published heuristic filters of Gopher, C4 and FineWeb as `Filter`s.

- `GopherQuality` and `GopherRepetition`: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
  from Training Gopher", appendix A (MassiveText quality and repetition filters).
- `C4Filter`: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", section 2.2 (Colossal Clean Crawled Corpus).
- `FineWebFilter`: Penedo et al. 2024, "The FineWeb Datasets", section 3 (the custom line-level filters).

Every threshold is a constructor argument defaulting to the published value, and every drop reason starts with
the rule's family ("gopher:", "c4:", "fineweb:") so curation counts read as the papers' rule names.

Words are whitespace-separated tokens (`str.split()`): the papers tokenise with heavier tools, but the rules are
ratios whose thresholds were set loosely, and a C-level split keeps the filters fast enough to run on every
document. Lines are the `\\n`-separated pieces of the text, stripped, with blank ones ignored, so a page's
layout whitespace does not count as content. A measure is compared with its threshold as the ratio itself, so
a document exactly at a threshold is kept.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np

from lmforge.data.base_filter import Filter
from lmforge.data.base_reader import Document

log = logging.getLogger(__name__)

_GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_BULLETS = ("•", "-", "*", "‣", "◦", "●", "▪", "–")
_ELLIPSES = ("...", "…")
# A letter in any script: \w minus digits and underscore.
_HAS_ALPHA = re.compile(r"[^\W\d_]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")

# Gopher's repetition thresholds, n -> the highest allowed character fraction.
GOPHER_TOP_NGRAM_FRACTIONS: Mapping[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAM_FRACTIONS: Mapping[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

# C4 keeps a line only if it ends like a sentence; the closing curly quote is the typographic form of '"'.
C4_END_MARKS = (".", "!", "?", '"', "”")
# The C4 "policy" rule: boilerplate about cookies and terms that sits on many pages (Raffel et al. 2020, 2.2).
C4_POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
# The line rules of `C4Filter`, in the order they are checked: the keys of `meta["c4_lines_removed"]`.
C4_LINE_RULES = ("too long word", "punctuation", "too few words", "javascript", "policy")
# Wikipedia-style citation marks, cut out of a line before its end is checked (as C4 does).
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
# A sentence ends at . ! or ? (optionally followed by closing quotes or brackets) before whitespace or the end, so
# "3.5" and "e.g.," are not boundaries; nor is the period of a lone capital letter, an initial ("Ulysses S. Grant",
# "U.S. Army"), which C4's sentence splitter (NLTK's punkt) does not split at either.
_SENTENCE_END = re.compile(r"(?:(?<!\b[A-Z])\.|[!?])[.!?]*[\"'”’)\]]*(?=\s|$)")

# FineWeb counts a line as ending in punctuation with this set (terminal marks and closing quotes).
FINEWEB_END_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", "…")


def _lines(text: str) -> list[str]:
    """The stripped, non-blank lines of `text`."""
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def _duplicate_stats(segments: Sequence[str]) -> tuple[int, int, int]:
    """(duplicate count, duplicate characters, total characters) of `segments`.

    A segment is a duplicate when an identical segment came before it, so the first occurrence counts as original
    and only the repeats are counted, as in Gopher's definition.
    """
    seen: set[str] = set()
    dup_count = dup_chars = total_chars = 0
    for seg in segments:
        n = len(seg)
        total_chars += n
        if seg in seen:
            dup_count += 1
            dup_chars += n
        else:
            seen.add(seg)
    return dup_count, dup_chars, total_chars


class GopherQuality(Filter):
    """Gopher's quality rules (Rae et al. 2021, A.1.1), checked in this order, each a drop reason:

    - "gopher: word count": fewer than `min_words` (50) or more than `max_words` (100,000) words;
    - "gopher: mean word length": mean word length outside `min_mean_word_length`..`max_mean_word_length` (3..10);
    - "gopher: hash-to-word ratio" and "gopher: ellipsis-to-word ratio": "#" count / words, or ellipsis count
      ("..." or "…") / words, above `max_symbol_word_ratio` (0.1); the paper applies the limit to either symbol
      alone, not to their sum;
    - "gopher: alphabetic words": fewer than `min_alpha_word_fraction` (0.8) of words contain a letter;
    - "gopher: stop words": fewer than `min_stop_words` (2) different words among the stop words
      the, be, to, of, and, that, have, with (whole words, any case): "at least two of the following words";
    - "gopher: bullet lines": more than `max_bullet_line_fraction` (0.9) of lines start with a bullet;
    - "gopher: ellipsis lines": more than `max_ellipsis_line_fraction` (0.3) of lines end with an ellipsis.
    """

    name = "gopher_quality"

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_mean_word_length: float = 3.0,
        max_mean_word_length: float = 10.0,
        max_symbol_word_ratio: float = 0.1,
        min_alpha_word_fraction: float = 0.8,
        min_stop_words: int = 2,
        max_bullet_line_fraction: float = 0.9,
        max_ellipsis_line_fraction: float = 0.3,
        stop_words: Sequence[str] = _GOPHER_STOP_WORDS,
    ) -> None:
        self.min_words = min_words
        self.max_words = max_words
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.min_alpha_word_fraction = min_alpha_word_fraction
        self.min_stop_words = min_stop_words
        self.max_bullet_line_fraction = max_bullet_line_fraction
        self.max_ellipsis_line_fraction = max_ellipsis_line_fraction
        # One alternation scanned in C beats lowercasing and testing every word in Python.
        self._stop_word = re.compile(r"\b(?:" + "|".join(map(re.escape, stop_words)) + r")\b", re.IGNORECASE)

    def apply(self, doc: Document) -> Document | str:
        text = doc.text
        words = text.split()
        n_words = len(words)
        if not self.min_words <= n_words <= self.max_words:
            return "gopher: word count"
        mean_len = sum(map(len, words)) / n_words
        if not self.min_mean_word_length <= mean_len <= self.max_mean_word_length:
            return "gopher: mean word length"
        if text.count("#") / n_words > self.max_symbol_word_ratio:
            return "gopher: hash-to-word ratio"
        if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return "gopher: ellipsis-to-word ratio"
        search = _HAS_ALPHA.search
        alpha_words = sum(1 for w in words if search(w))
        if alpha_words / n_words < self.min_alpha_word_fraction:
            return "gopher: alphabetic words"
        if not self._has_stop_words(text):
            return "gopher: stop words"
        lines = _lines(text)
        n_lines = len(lines)
        if sum(1 for s in lines if s.startswith(_BULLETS)) / n_lines > self.max_bullet_line_fraction:
            return "gopher: bullet lines"
        if sum(1 for s in lines if s.endswith(_ELLIPSES)) / n_lines > self.max_ellipsis_line_fraction:
            return "gopher: ellipsis lines"
        return doc

    def _has_stop_words(self, text: str) -> bool:
        # Stop at the threshold: a normal page passes after a few words instead of a full scan.
        if self.min_stop_words <= 0:
            return True
        found: set[str] = set()
        for match in self._stop_word.finditer(text):
            found.add(match.group().lower())
            if len(found) >= self.min_stop_words:
                return True
        return False


class GopherRepetition(Filter):
    """Gopher's repetition rules (Rae et al. 2021, A.1.1 and table A1), checked in this order:

    - "gopher: duplicate lines": lines that repeat an earlier line / lines above `max_dup_line_fraction` (0.30);
    - "gopher: duplicate line chars": characters in those repeated lines / characters in all lines above
      `max_dup_line_char_fraction` (0.20);
    - "gopher: duplicate paragraphs" and "gopher: duplicate paragraph chars": the same two measures over paragraphs
      (text separated by a blank line), limits `max_dup_para_fraction` (0.30) and `max_dup_para_char_fraction`
      (0.20);
    - "gopher: top {n}-gram": for n in `top_ngram_fractions` ({2: 0.20, 3: 0.18, 4: 0.16}), the most frequent word
      n-gram (ties: the longest), if it occurs more than once, covers (its occurrences x its characters) / total
      word characters above the limit. A text without any repeated n-gram has nothing repetitive: counting a
      single occurrence (datatrove does) would drop short texts for their longest words alone;
    - "gopher: duplicate {n}-grams": for n in `dup_ngram_fractions` ({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12,
      9: 0.11, 10: 0.10}), the characters of the words covered by word n-grams that repeat an earlier occurrence
      (each word counted once however many such n-grams cover it) / total word characters above the limit. The
      first occurrence is the original, as for duplicate lines, so a passage that appears twice counts once.

    Characters of lines and paragraphs are counted after stripping; word characters exclude whitespace.
    """

    name = "gopher_repetition"

    def __init__(
        self,
        max_dup_line_fraction: float = 0.30,
        max_dup_line_char_fraction: float = 0.20,
        max_dup_para_fraction: float = 0.30,
        max_dup_para_char_fraction: float = 0.20,
        top_ngram_fractions: Mapping[int, float] = GOPHER_TOP_NGRAM_FRACTIONS,
        dup_ngram_fractions: Mapping[int, float] = GOPHER_DUP_NGRAM_FRACTIONS,
    ) -> None:
        self.max_dup_line_fraction = max_dup_line_fraction
        self.max_dup_line_char_fraction = max_dup_line_char_fraction
        self.max_dup_para_fraction = max_dup_para_fraction
        self.max_dup_para_char_fraction = max_dup_para_char_fraction
        self.top_ngram_fractions = dict(sorted(top_ngram_fractions.items()))
        # Ascending n lets `apply` stop early: without a repeated n-gram there is no repeated longer one.
        self.dup_ngram_fractions = dict(sorted(dup_ngram_fractions.items()))
        self.max_n = max([*self.top_ngram_fractions, *self.dup_ngram_fractions], default=1)

    def apply(self, doc: Document) -> Document | str:
        text = doc.text
        reason = self._check_segments(_lines(text), "line", self.max_dup_line_fraction, self.max_dup_line_char_fraction)
        if reason:
            return reason
        paragraphs = [s for s in (p.strip() for p in _PARAGRAPH_BREAK.split(text)) if s]
        reason = self._check_segments(
            paragraphs, "paragraph", self.max_dup_para_fraction, self.max_dup_para_char_fraction
        )
        if reason:
            return reason
        words = text.split()
        if len(words) < 2:
            return doc
        grams = _NGramIndex(words)
        for n in range(2, self.max_n + 1):
            grams.extend()
            # Without a repeated n-gram there is no repeated longer one: every remaining measure is 0.
            if not grams.has_repeats():
                break
            if n in self.top_ngram_fractions and grams.top_chars() / grams.total > self.top_ngram_fractions[n]:
                return f"gopher: top {n}-gram"
            if n in self.dup_ngram_fractions and grams.duplicate_chars() / grams.total > self.dup_ngram_fractions[n]:
                return f"gopher: duplicate {n}-grams"
        return doc

    @staticmethod
    def _check_segments(segments: list[str], kind: str, max_fraction: float, max_char_fraction: float) -> str:
        if not segments:
            return ""
        dup_count, dup_chars, total_chars = _duplicate_stats(segments)
        if dup_count / len(segments) > max_fraction:
            return f"gopher: duplicate {kind}s"
        if dup_chars / total_chars > max_char_fraction:
            return f"gopher: duplicate {kind} chars"
        return ""


class _NGramIndex:
    """Exact integer ids for every word n-gram of a document, built up one n at a time with numpy.

    The id of an n-gram is the rank of the pair (id of its first (n-1)-gram, id of its last word), so ids stay
    below the word count, pairs fit in int64 and equal ids mean equal n-grams: no hashing, no collisions, and
    each n costs one `np.unique` instead of a Python loop over tuples.
    """

    def __init__(self, words: list[str]) -> None:
        vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
        self.word_ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=len(words))
        self.vocab_size = len(vocab)
        self.word_lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.char_prefix = np.concatenate(([0], np.cumsum(self.word_lengths)))
        self.total = int(self.char_prefix[-1])
        self.n = 1
        self.ids = self.word_ids
        self.counts = np.ones(self.vocab_size, dtype=np.int64)

    def extend(self) -> None:
        """Move from (n-1)-grams to n-grams."""
        self.n += 1
        pairs = self.ids[:-1] * self.vocab_size + self.word_ids[self.n - 1 :]
        _, self.ids, self.counts = np.unique(pairs, return_inverse=True, return_counts=True)

    def has_repeats(self) -> bool:
        """Whether some n-gram occurs more than once."""
        return bool(len(self.counts)) and int(self.counts.max()) > 1

    def _gram_chars(self) -> np.ndarray:
        """Word characters of the n-gram starting at each position."""
        return self.char_prefix[self.n :] - self.char_prefix[: -self.n]

    def top_chars(self) -> int:
        """Occurrences x characters of the most frequent n-gram (ties: the longest), 0 if no n-gram repeats."""
        best = int(self.counts.max())
        if best < 2:
            return 0
        at_best = self.counts[self.ids] == best
        return best * int(self._gram_chars()[at_best].max())

    def duplicate_chars(self) -> int:
        """Characters of the words covered by an n-gram occurrence that repeats an earlier one, each word once."""
        positions = np.arange(len(self.ids))
        first = np.full(len(self.counts), len(self.ids), dtype=np.int64)
        np.minimum.at(first, self.ids, positions)
        repeated = positions != first[self.ids]
        covered = np.zeros(len(self.word_ids), dtype=bool)
        for k in range(self.n):
            covered[k : k + len(repeated)] |= repeated
        return int(self.word_lengths[covered].sum())


class C4Filter(Filter):
    """C4's cleaning rules (Raffel et al. 2020, 2.2). It rewrites the text to the lines it keeps.

    Defaults are the values and the order of checks the released C4 was built with (TensorFlow Datasets
    `c4_utils.clean_page`): lines of at least 5 words, pages of at least 3 sentences. C4's bad-words list is not
    applied here (bad words belong to a separate blocklist step).

    Each line (stripped, blank ones skipped) goes through these checks in order; a line that fails one is removed
    and counted in `doc.meta["c4_lines_removed"]` (a dict over all five keys, zeros included):
    - "too long word": a word longer than `max_word_length` (1000; None turns the rule off) characters;
    - then, with `remove_citations`, Wikipedia citation marks ("[12]", "[edit]", "[citation needed]") are cut out;
    - "punctuation": the line does not end with one of `end_marks` (. ! ? " ”), or ends with "..." (a truncated
      teaser) while `drop_ellipsis_lines` is set;
    - "too few words": fewer than `min_words_per_line` (5) words;
    - "c4: lorem ipsum" drops the whole page when a line that got this far contains "lorem ipsum";
    - "javascript": the line mentions "javascript" (cookie and JavaScript warnings);
    - "c4: curly bracket" drops the whole page when such a line contains "{" and `drop_curly_bracket` is set. C4
      drops these to remove code; off by default because lmforge also curates code;
    - "policy": the line contains one of `policy_substrings` ("privacy policy", "uses cookies", ...); pass ()
      to turn the rule off.

    As in C4, the page-level rules look only at lines that survived the checks before them, so placeholder text or
    a brace in a navigation line without an end mark does not cost the page.

    Finally "c4: too few sentences": the kept lines hold fewer than `min_sentences` (3) sentences. A sentence
    ends at . ! or ? before whitespace; every kept line counts as at least one, as it ends with a terminal mark.
    """

    name = "c4"

    def __init__(
        self,
        min_words_per_line: int = 5,
        min_sentences: int = 3,
        end_marks: Sequence[str] = C4_END_MARKS,
        policy_substrings: Sequence[str] = C4_POLICY_SUBSTRINGS,
        drop_curly_bracket: bool = False,
        max_word_length: int | None = 1000,
        drop_ellipsis_lines: bool = True,
        remove_citations: bool = True,
    ) -> None:
        self.min_words_per_line = min_words_per_line
        self.min_sentences = min_sentences
        self.max_word_length = max_word_length
        self.end_marks = tuple(end_marks)
        self.policy_substrings = tuple(s.lower() for s in policy_substrings)
        self.drop_curly_bracket = drop_curly_bracket
        self.drop_ellipsis_lines = drop_ellipsis_lines
        self.remove_citations = remove_citations

    def apply(self, doc: Document) -> Document | str:
        removed = dict.fromkeys(C4_LINE_RULES, 0)
        kept: list[str] = []
        sentences = 0
        min_words = self.min_words_per_line
        max_word = self.max_word_length
        end_marks = self.end_marks
        for line in doc.text.split("\n"):
            line = line.strip()
            if not line:
                continue
            # Only a line longer than the limit can hold a word longer than it.
            if max_word is not None and len(line) > max_word and any(len(w) > max_word for w in line.split()):
                removed["too long word"] += 1
                continue
            if self.remove_citations and "[" in line:
                line = _CITATION.sub("", line)
            if not line.endswith(end_marks) or (self.drop_ellipsis_lines and line.endswith("...")):
                removed["punctuation"] += 1
                continue
            # maxsplit stops the split once the minimum is reached, so long lines cost no more than short ones.
            if len(line.split(None, min_words)) < min_words:
                removed["too few words"] += 1
                continue
            low = line.lower()
            if "lorem ipsum" in low:
                return "c4: lorem ipsum"
            if "javascript" in low:
                removed["javascript"] += 1
                continue
            if self.drop_curly_bracket and "{" in line:
                return "c4: curly bracket"
            if any(s in low for s in self.policy_substrings):
                removed["policy"] += 1
                continue
            kept.append(line)
            sentences += max(1, len(_SENTENCE_END.findall(line)))
        if sentences < self.min_sentences:
            return "c4: too few sentences"
        return dataclasses.replace(doc, text="\n".join(kept), meta={**doc.meta, "c4_lines_removed": removed})


class FineWebFilter(Filter):
    """FineWeb's custom filters (Penedo et al. 2024, section 3.3), checked in this order:

    - "fineweb: empty": no non-blank line;
    - "fineweb: line punctuation": fewer than `min_punct_line_fraction` (0.12) of lines end with one of
      `end_punctuation` (. ! ? ' " ’ ” …); FineWeb found pages of navigation and lists fail this;
    - "fineweb: duplicate line chars": characters in lines repeating an earlier line / characters in all lines
      above `max_dup_line_char_fraction` (0.1);
    - "fineweb: short lines": more than `max_short_line_fraction` (0.67) of lines are shorter than
      `short_line_chars` (30) characters.
    """

    name = "fineweb"

    def __init__(
        self,
        min_punct_line_fraction: float = 0.12,
        max_dup_line_char_fraction: float = 0.1,
        max_short_line_fraction: float = 0.67,
        short_line_chars: int = 30,
        end_punctuation: Sequence[str] = FINEWEB_END_PUNCTUATION,
    ) -> None:
        self.min_punct_line_fraction = min_punct_line_fraction
        self.max_dup_line_char_fraction = max_dup_line_char_fraction
        self.max_short_line_fraction = max_short_line_fraction
        self.short_line_chars = short_line_chars
        self.end_punctuation = tuple(end_punctuation)

    def apply(self, doc: Document) -> Document | str:
        lines = _lines(doc.text)
        n_lines = len(lines)
        if not n_lines:
            return "fineweb: empty"
        punct = sum(1 for s in lines if s.endswith(self.end_punctuation))
        if punct / n_lines < self.min_punct_line_fraction:
            return "fineweb: line punctuation"
        _, dup_chars, total_chars = _duplicate_stats(lines)
        if dup_chars / total_chars > self.max_dup_line_char_fraction:
            return "fineweb: duplicate line chars"
        short = sum(1 for s in lines if len(s) < self.short_line_chars)
        if short / n_lines > self.max_short_line_fraction:
            return "fineweb: short lines"
        return doc


QUALITY_FILTERS: dict[str, type[Filter]] = {
    "gopher_quality": GopherQuality,
    "gopher_repetition": GopherRepetition,
    "c4": C4Filter,
    "fineweb": FineWebFilter,
}


def build_quality_filters(names: list[str], **overrides: Mapping[str, object]) -> list[Filter]:
    """The named quality filters, in the order given, with published thresholds unless overridden.

    `overrides` maps a filter name to its constructor arguments, e.g.
    `build_quality_filters(["c4"], c4={"drop_curly_bracket": True})`. An unknown filter name or argument raises
    `ValueError` naming it and the allowed values.
    """
    unknown = [n for n in [*names, *overrides] if n not in QUALITY_FILTERS]
    if unknown:
        raise ValueError(f"quality filter {unknown[0]!r}: allowed values are {list(QUALITY_FILTERS)}")
    stray = [n for n in overrides if n not in names]
    if stray:
        raise ValueError(f"quality override {stray[0]!r} names a filter not in {names}")
    filters: list[Filter] = []
    for name in names:
        cls = QUALITY_FILTERS[name]
        kwargs = dict(overrides.get(name, {}))
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        bad = [k for k in kwargs if k not in allowed]
        if bad:
            raise ValueError(f"{name}.{bad[0]}: allowed settings are {allowed}")
        filters.append(cls(**kwargs))
    log.debug("quality filters: %s", names)
    return filters
