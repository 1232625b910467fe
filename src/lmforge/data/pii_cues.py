"""Context cues for pii_ner: what stands around a capitalised candidate says it is a work's title, a street, an
employer or a company rather than a person, or a person named as a work's author ("the Castro novel")."""

from __future__ import annotations

import re

from lmforge.data import pii_lexicon

CAP = r"[A-ZÀ-ÖØ-Þ][\w'’-]*"  # a capitalised word (Latin letters with accents included)
CONTEXT_CHARS = 24  # how far before a candidate its cue words are looked for

# A work's title: "the film X", "see X", or "X is a 2017 Polish action film".
_WORK_BEFORE = re.compile(r"(?i)\b(?:film|movie|song|album|book|novel|series|show|single|track|see)\s[\"“']?$")
_WORK_AFTER = re.compile(r"\s(?:is|was) an? \d{4}\b")
# A street or place next to an address: "the corner of X", "X 7", "5850 X", "Csabai kapu 39. and X", "X and
# Hersnapvej 75", "Dili Street and X", or a street by its last word ("Inna Loop St.").
_STREETS = r"(?:St|Str|Street|Road|Rd|Avenue|Ave|Lane)\.?"
_STREET_BEFORE = re.compile(rf"(?i)\b(?:corner of|\d+\.?(?: and)?|{_STREETS} and)[ \t]$")
_STREET_AFTER_NAME = re.compile(rf"[ \t]\d|[ \t]and[ \t](?:{CAP}[ \t]){{1,3}}\d")
_STREET_END = re.compile(rf"\s{_STREETS}$")
# "the Castro novel": a work named by its author, a person.
_AUTHOR_OF = re.compile(r"\s(?:novel|book|film|movie|song|album|version|play|biography|poem)s?\b")
# A company by how it is described ("X is a 501(c)3", "X is an Swedish multinational"), or by its name's shape:
# three surnames listed on a line of their own or before a noun ("Marshall, Hernandez and Simpson\n"), or two
# joined by a hyphen with no first name ("Ramsey-Johnson").
_COMPANY_AFTER = re.compile(
    r"\s(?:is|was) an? (?:[\w-]+ ){0,3}?(?:company|agency|firm|multinational|corporation|non-?profit|charity"
    r"|startup|bank|501\(c\)\s?3)\b"
)
_SURNAME_LIST = re.compile(rf"(?<![\w,] )\b({CAP}), ({CAP}),? (?:and|&) ({CAP})\b(?=[ \t]*(?:$|\n|[a-z]))", re.M)
_SURNAME_PAIR = re.compile(r"([A-Z][a-z]+)-([A-Z][a-z]+)")
_EMPLOYER_BEFORE = re.compile(r"(?i)\b(?:work(?:s|ed|ing)? (?:for|at)|employed by|employer:?)\s$")


def known_name(word: str) -> bool:
    """Whether the lower-case `word` is a census first name or surname."""
    return word in pii_lexicon.first_names() or word in pii_lexicon.surnames()


def company_shape(text: str, first: int, last: int) -> bool:
    """Whether `text[first:last]` is a company by its description or its name's shape (see `_COMPANY_AFTER`)."""
    if _COMPANY_AFTER.match(text, last):
        return True
    pair = _SURNAME_PAIR.fullmatch(text, first, last)
    if pair and all(w.lower() in pii_lexicon.surnames() for w in pair.groups()):
        return True
    window = (max(0, first - 2 * CONTEXT_CHARS), min(len(text), last + 2 * CONTEXT_CHARS))
    for m in _SURNAME_LIST.finditer(text, *window):
        if m.start() <= first and last <= m.end():
            return all(w.lower() in pii_lexicon.surnames() for w in m.groups())
    return False


def work_or_street(text: str, first: int, last: int) -> bool:
    """Whether the text at `first:last` is a work's title or a street by its context (see `_WORK_BEFORE`)."""
    before = text[max(0, first - CONTEXT_CHARS) : first]
    if _WORK_BEFORE.search(before) or _STREET_BEFORE.search(before) or _STREET_END.search(text, first, last):
        return True
    return _WORK_AFTER.match(text, last) is not None or _STREET_AFTER_NAME.match(text, last) is not None


def employer_before(text: str, first: int) -> bool:
    """Whether the words before `first` introduce an employer ("I work for X")."""
    return _EMPLOYER_BEFORE.search(text, max(0, first - CONTEXT_CHARS), first) is not None


def author_of(text: str, last: int) -> bool:
    """Whether a work follows `last` ("... novel"), so that "the X novel" names X as its author."""
    return _AUTHOR_OF.match(text, last) is not None
