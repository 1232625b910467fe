"""The classic NLP preprocessing steps, as optional curation filters, all off by default (docs/curation.md).

Lower-casing, stop-word removal and spelling correction come from text classification and retrieval, where a
bag of words is all the model sees. A language model is trained to read and write real text, so pre-training
leaves them off: case, function words and even misspellings carry signal, the tokenizer already handles their
variety, and a model trained on normalised text writes normalised text. They are here for corpora meant for such
models (a classic classifier's training set, keyword indexes) and for experiments that measure what they cost.

Each is a `Filter` that never drops a document; the curate stage counts the documents each one changed in
`stats.json` -> `modified` (under `lowercase`, `stop_words`, `spelling`). They run after every filter that judges
the text as written (code rules, language, quality, toxicity, PII, decontamination: those read case and stop
words) and before deduplication, so copies that differ only in what they remove collapse.

Words are runs of letters (`[^\\W\\d_]+`); everything between them (spaces, punctuation, digits, line breaks) is
kept as it is, except that a removed stop word takes the spaces and tabs after it along.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from typing import Any

from lmforge.data.base_filter import Filter
from lmforge.data.base_reader import Document

_WORD = re.compile(r"[^\W\d_]+")
_STOP_WORD_AND_SPACE = re.compile(r"([^\W\d_]+)[ \t]*")
# symspellpy's English dictionary: 82,765 words with their frequencies, shipped inside the package.
_DICTIONARY = "frequency_dictionary_en_82_765.txt"
_MIN_SPELL_CHARS = 3  # shorter words are left alone: within one or two edits of them lies half the dictionary


def _changed(doc: Document, text: str) -> Document:
    return doc if text == doc.text else dataclasses.replace(doc, text=text)


def _missing(package: str, setting: str) -> ImportError:
    return ImportError(f"data.{setting} needs {package}: pip install 'lmforge[normalize]' (or pip install {package}),"
                       f" or set data.{setting}: false")  # fmt: skip


class Lowercase(Filter):
    """Every character in lower case (`str.lower`, which also folds non-Latin scripts)."""

    name = "lowercase"

    def apply(self, doc: Document) -> Document:
        return _changed(doc, doc.text.lower())


@functools.cache
def english_stop_words() -> frozenset[str]:
    """spaCy's English stop words (326 words, shipped in the package: no model or download needed)."""
    try:
        from spacy.lang.en.stop_words import STOP_WORDS
    except ImportError as e:
        raise _missing("spacy", "remove_stop_words") from e
    return frozenset(STOP_WORDS)


class StopWordRemover(Filter):
    """Delete English stop words (compared in lower case), each with the spaces and tabs that follow it."""

    name = "stop_words"

    def __init__(self, stop_words: frozenset[str] | None = None) -> None:
        self.stop_words = english_stop_words() if stop_words is None else stop_words

    def _keep(self, match: re.Match[str]) -> str:
        return "" if match.group(1).lower() in self.stop_words else match.group(0)

    def apply(self, doc: Document) -> Document:
        return _changed(doc, _STOP_WORD_AND_SPACE.sub(self._keep, doc.text))


@functools.cache
def _symspell() -> Any:
    try:
        from symspellpy import SymSpell
    except ImportError as e:
        raise _missing("symspellpy", "spell_correct") from e
    speller = SymSpell(max_dictionary_edit_distance=2, prefix_length=7)
    # About 4 s, once per worker process.
    speller.load_dictionary(str(importlib.resources.files("symspellpy") / _DICTIONARY), term_index=0, count_index=1)
    return speller


def _recased(word: str, correction: str) -> str:
    """`correction` with the case pattern of `word`: Capitalised stays capitalised."""
    return correction[:1].upper() + correction[1:] if word[:1].isupper() else correction


class SpellingCorrector(Filter):
    """Replace each word missing from symspellpy's English dictionary by its most frequent neighbour within
    one edit (words up to four letters) or two (longer words); words with no neighbour stay as they are.

    Words shorter than three letters and all-capital words (acronyms: NASA, HTTP) are not looked up.
    """

    name = "spelling"

    def __init__(self) -> None:
        from symspellpy import Verbosity

        self.speller, self.top = _symspell(), Verbosity.TOP

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one corrector per worker; words repeat a lot
    def _correct(self, word: str) -> str:
        lower = word.lower()
        found = self.speller.lookup(lower, self.top, max_edit_distance=1 if len(lower) <= 4 else 2)
        return _recased(word, found[0].term) if found and found[0].term != lower else word

    def _fix(self, match: re.Match[str]) -> str:
        word = match.group(0)
        if len(word) < _MIN_SPELL_CHARS or (word.isupper() and len(word) > 1):
            return word
        return self._correct(word)

    def apply(self, doc: Document) -> Document:
        return _changed(doc, _WORD.sub(self._fix, doc.text))


def build_preprocessors(lowercase: bool, remove_stop_words: bool, spell_correct: bool) -> list[Filter]:
    """The steps asked for, in the order they run: spelling first (the dictionary lookup keeps the case it found),
    then stop words (a corrected word may be one), then lower-casing."""
    steps: list[Filter] = []
    if spell_correct:
        steps.append(SpellingCorrector())
    if remove_stop_words:
        steps.append(StopWordRemover())
    if lowercase:
        steps.append(Lowercase())
    return steps
