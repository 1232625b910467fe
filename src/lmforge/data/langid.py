"""Language identification: keep documents in the languages a corpus is meant to hold.

`LanguageFilter` classifies a bounded sample of each document with py3langid (a naive Bayes model over byte
n-grams that ships inside the package, so nothing is downloaded) and keeps the document when the most likely
language is one of `languages` with a normalised probability of at least `min_confidence`. Kept documents carry
`meta["language"]` and `meta["language_score"]`, so later stages and reports can use the label without
classifying again. With `languages=()` the filter only annotates and never drops.

Drop reasons: "language: low confidence" when the best probability is below `min_confidence`, otherwise
"language: <code>" (for example "language: de") naming the language that was found.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from lmforge.data.base_filter import Filter
from lmforge.data.base_reader import Document


@functools.cache
def _identifier() -> LanguageIdentifier:
    """The process-wide identifier, loaded on first use.

    Loading decompresses the model (about half a second), so it happens once per process and only when a
    document is classified or a setting is checked, never at import. A private instance rather than py3langid's
    module-level one, because `py3langid.set_languages` would otherwise change what every caller sees.
    `norm_probs=True` turns the naive Bayes scores into probabilities that sum to one, which is what makes a
    single `min_confidence` threshold mean the same thing for short and long samples.
    """
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def text_sample(text: str, sample_chars: int) -> str:
    """The first `sample_chars` characters of `text` with every run of whitespace collapsed to one space.

    Collapses a growing prefix instead of the whole text so that a multi-megabyte document costs no more than its
    sample. The collapsed form of any prefix is itself a prefix of the collapsed whole, so the result is exact.
    """
    window = 2 * sample_chars
    while True:
        collapsed = " ".join(text[:window].split())
        if len(collapsed) >= sample_chars or window >= len(text):
            return collapsed[:sample_chars]
        window *= 2  # mostly whitespace so far: look further


def detect_language(text: str, sample_chars: int = 2000) -> tuple[str, float]:
    """The most likely language code of `text` and its probability, judged on a bounded sample."""
    code, score = _identifier().classify(text_sample(text, sample_chars))
    return code, float(score)


class LanguageFilter(Filter):
    """Keeps documents whose language is in `languages` with probability ≥ `min_confidence` (see module doc)."""

    name = "language"

    def __init__(
        self, languages: Sequence[str] = ("en",), min_confidence: float = 0.65, sample_chars: int = 2000
    ) -> None:
        if isinstance(languages, str):  # "en" would otherwise be read as the codes "e" and "n"
            languages = (languages,)
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"language min_confidence={min_confidence} must be between 0 and 1")
        if sample_chars < 1:
            raise ValueError(f"language sample_chars={sample_chars} must be at least 1")
        known = _identifier().labels
        unknown = sorted(set(languages) - set(known))
        if unknown:
            raise ValueError(f"language codes {unknown} are not known to py3langid; allowed values are {known}")
        self.languages = frozenset(languages)
        self.min_confidence = min_confidence
        self.sample_chars = sample_chars

    def apply(self, doc: Document) -> Document | str:
        code, score = detect_language(doc.text, self.sample_chars)
        if self.languages:
            if score < self.min_confidence:
                return "language: low confidence"
            if code not in self.languages:
                return f"language: {code}"
        # A copy rather than an in-place edit, so the caller's document is never changed behind its back.
        meta = {**doc.meta, "language": code, "language_score": score}
        return dataclasses.replace(doc, meta=meta)
