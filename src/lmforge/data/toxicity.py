"""Toxicity: a lexicon filter that drops documents whose share of offensive words or phrases is too high.

The default lexicon is the word list that the `better_profanity` package ships as a data file,
`better_profanity/profanity_wordlist.txt`. The file is read through `importlib.resources`; the package's code is
never called, because its censoring API checks one word at a time and is far slower than one set lookup per token.
Users may add their own lists: plain text files with one word or phrase per line, `#` comment lines and blank
lines ignored (the format of the LDNOOBW "List of Dirty, Naughty, Obscene, and Otherwise Bad Words").

Matching works on tokens, never on substrings, so a bad word inside a longer innocent word ("Scunthorpe") does not
match:
- the text is lowercased and split into tokens, each a run of letters, digits, `@` or `$`; every other character
  (space, punctuation, `_`, `-`) separates tokens. Lexicon entries are split the same way, so "ass-fucker" in a list
  matches "ass fucker" and "ass-fucker" in text, and a multi-word entry is matched as a sequence of tokens;
- a letter spelled out with separators ("f.u.c.k", "f-u-c-k", "f_u_c_k": three or more single characters joined
  by one of `.`, `-`, `_`) is joined back into one token first;
- leetspeak: a token that is not purely alphabetic and has at least as many letters as digits has 0→o, 1→i (or l
  where that makes a lexicon token), 3→e, 4→a, 5→s, 7→t, @→a, $→s, !→i replaced ("!" is part of a token only
  before a letter). Lexicon entries are normalised the same way. The letters-versus-digits rule keeps numbers, hex
  constants ("a55", "0x7f") and prices ("$4") from being rewritten into words;
- words in `allow` (default `DEFAULT_ALLOW`: entries of the default list with an innocent everyday meaning, such as
  "len", "kill", "strip", "god") are never counted.

A match is the longest lexicon entry starting at a token; tokens it covers are not matched again, so a phrase
counts once. The ratio is matches divided by tokens. A document is dropped when `matches > max_count`
("toxicity: count", checked first) or `ratio > max_ratio` ("toxicity: ratio"); a document exactly at a threshold
is kept, as in `quality.py`. A kept document gets `meta["toxicity"] = {"matches": k, "ratio": r}`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmforge.data.base_filter import Filter
from lmforge.data.base_reader import Document

_DEFAULT_PACKAGE = "better_profanity"
_DEFAULT_FILE = "profanity_wordlist.txt"
# "!" counts as a letter only between letters ("sh!t"), so a sentence's closing "!" stays punctuation. "_" is
# replaced by a space before this runs (`_tokenize`), which lets the pattern use the fast `\w` class.
_TOKEN = re.compile(r"[\w@$]+(?:![\w@$]+)*")
# Three or more single letters or digits joined by ".", "-" or "_": the classic way to slip a word past a lexicon.
# Needing three keeps two-letter abbreviations ("e.g.", "i.e.") apart; versions ("3.11.5" has a two-digit part,
# "1.2.3" joins to "123") end up as digit tokens, which the leetspeak rule leaves alone.
_SPELLED_OUT = re.compile(r"(?<![^\W_])[^\W_][._-][^\W_](?:[._-][^\W_])+(?![^\W_])")
_SEPARATORS = re.compile(r"[._-]")
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
# "1" stands for either "i" or "l"; `_deleet` tries both.
_LEET_I = str.maketrans({**_LEET, "1": "i"})
_LEET_L = str.maketrans({**_LEET, "1": "l"})
_DIGITS = frozenset("0123456789")
# Entries of the default list whose everyday meaning is innocent (ordinary English, code, medicine, identity terms
# that lexicon filters are known to over-flag, placeholders such as "xxx"). Measured on the stdlib and the C4 demo,
# these words alone made the default list drop clean documents; a caller may pass `allow=()` to keep them.
DEFAULT_ALLOW = frozenset(
    """
    len sh xx xxx dummy foobar fubar guido god kill murder strip stroke slave meth rum vodka hemp pot weed toke
    stoned junkie junky hookah hooch opium opiate heroin valium viagra peyote ganja reefer napalm sniper uzi
    pawn sandbar seaman seamen massa maxi paddy pasty pastie revue tramp slope screw screwed thrust tinkle toots
    undies unwed vixen voyeur wad whiz willies woody wazoo wang weenie weiner loin loins lust lusting lusty naked
    nude nudes drunk erect facial organ oral orally ovary ovum ovums uterus womb rectal rectum rectus urine
    urinal breasts nipple nipples hymen glans menses testes testis penile pubic herpes hiv leper inbred lech
    moron nimrod ninny doofus dopey weirdo schizo hump humped humping knob thug snatch snuff teat tush omg lmao
    niggle pollock aryan arian hebe cowgirl bondage gay gays homo queer queers prig prude racy steamy tawdry
    trashy sleaze sleazy souse soused playboy potty pee poop reich hitler nazi nazism vulgar ugly fat stupid
    virgin sexual vomit hell suck sucked sucking
    """.split()
)


def load_word_list(path: str | Path) -> set[str]:
    """Words and phrases of a list file (one per line; `#` comments and blank lines ignored), lowercased."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"toxicity word list not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"toxicity word list {path} is not UTF-8 text: {err}") from None
    words = _parse_words(text.splitlines())
    if not words:
        raise ValueError(f"toxicity word list {path} has no words (only blank or '#' comment lines)")
    return words


def default_word_list() -> set[str]:
    """The list shipped inside the `better_profanity` package, read as a data file."""
    resource = importlib.resources.files(_DEFAULT_PACKAGE) / _DEFAULT_FILE
    return _parse_words(resource.read_text(encoding="utf-8").splitlines())


def _parse_words(lines: Iterable[str]) -> set[str]:
    stripped = (line.strip().lower() for line in lines)
    return {line for line in stripped if line and not line.startswith("#")}


def _tokenize(text: str) -> list[str]:
    text = _SPELLED_OUT.sub(lambda m: _SEPARATORS.sub("", m.group()), text.lower())
    return _TOKEN.findall(text.replace("_", " "))


def _deleet(token: str, vocab: frozenset[str]) -> str:
    """Undo leet substitutions in a token with at least as many letters as digits; "1" becomes "i" unless "l"
    makes a lexicon token (`vocab`)."""
    if token.isalpha():
        return token
    if sum(c in _DIGITS for c in token) > sum(c.isalpha() for c in token):
        return token
    as_i = token.translate(_LEET_I)
    if "1" not in token or as_i in vocab:
        return as_i
    as_l = token.translate(_LEET_L)
    return as_l if as_l in vocab else as_i


class ToxicityFilter(Filter):
    """Drops documents with too many lexicon matches; see the module docstring for how words are matched.

    `word_lists`: list files to use instead of the default `better_profanity` list (pass the default's path too to
    extend it). `max_ratio`: the largest kept fraction of tokens that match. `max_count`: the largest kept number
    of matches, or None for no limit. `leetspeak`: undo common character substitutions before matching.
    `allow`: words and phrases never counted, whichever list has them (None: `DEFAULT_ALLOW`).
    """

    name = "toxicity"

    def __init__(
        self,
        word_lists: Sequence[str | Path] | None = None,
        max_ratio: float = 0.01,
        max_count: int | None = None,
        leetspeak: bool = True,
        allow: Iterable[str] | None = None,
    ) -> None:
        if not 0.0 <= max_ratio <= 1.0:
            raise ValueError(f"toxicity max_ratio={max_ratio}: must be between 0 and 1")
        if max_count is not None and max_count < 0:
            raise ValueError(f"toxicity max_count={max_count}: must be >= 0 or None")
        if word_lists is None:
            words = default_word_list()
        else:
            words = set().union(*(load_word_list(p) for p in word_lists)) if word_lists else set()
            if not words:
                raise ValueError("toxicity word_lists is empty: pass None for the default list")
        self.max_ratio = max_ratio
        self.max_count = max_count
        self.leetspeak = leetspeak
        # Entries are normalised exactly as text is, so a list's own leet spellings ("sh1t", "4r5e") collapse onto
        # the plain word and match every spelling of it; the list's plain words settle whether a "1" is an i or an l.
        plain = frozenset(t for word in words for t in _tokenize(word) if t.isalpha())
        entries = {self._entry(word, plain) for word in words} - {()}
        entries -= {self._entry(word, plain) for word in (DEFAULT_ALLOW if allow is None else allow)}
        # Single tokens go in a set; phrases are looked up only where their first token occurs, longest first, so
        # the common case is one set membership test per token.
        self._singles = frozenset(e[0] for e in entries if len(e) == 1)
        self._phrases = frozenset(e for e in entries if len(e) > 1)
        self._phrase_lengths = sorted({len(e) for e in self._phrases}, reverse=True)
        self._phrase_starts = frozenset(e[0] for e in self._phrases)
        self._vocab = frozenset(t for e in entries for t in e)

    def _entry(self, word: str, plain: frozenset[str]) -> tuple[str, ...]:
        tokens = _tokenize(word)
        return tuple(_deleet(t, plain) for t in tokens) if self.leetspeak else tuple(tokens)

    def tokens(self, text: str) -> list[str]:
        """The normalised tokens that matching sees (exposed so callers can inspect why a document matched)."""
        tokens = _tokenize(text)
        if not self.leetspeak:
            return tokens
        vocab = self._vocab
        return [t if t.isalpha() else _deleet(t, vocab) for t in tokens]

    def count_matches(self, tokens: Sequence[str]) -> int:
        """Non-overlapping lexicon matches in `tokens`, taking the longest entry at each position."""
        singles, starts = self._singles, self._phrase_starts
        if not any(t in singles or t in starts for t in tokens):
            return 0
        matches, i, n = 0, 0, len(tokens)
        while i < n:
            token = tokens[i]
            step = 0
            if token in starts:
                step = next(
                    (k for k in self._phrase_lengths if tuple(tokens[i : i + k]) in self._phrases), 0
                )
            if not step and token in singles:
                step = 1
            matches += step > 0
            i += step or 1
        return matches

    def apply(self, doc: Document) -> Document | str:
        tokens = self.tokens(doc.text)
        matches = self.count_matches(tokens)
        ratio = matches / len(tokens) if tokens else 0.0
        if self.max_count is not None and matches > self.max_count:
            return "toxicity: count"
        if ratio > self.max_ratio:
            return "toxicity: ratio"
        meta = {**doc.meta, "toxicity": {"matches": matches, "ratio": ratio}}
        return dataclasses.replace(doc, meta=meta)
