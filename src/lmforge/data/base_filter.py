"""The base class of curation steps, apart from the steps themselves (as datatrove's base_filter.py is).

A filter looks at one document and either returns a document to keep (the same one, or a transformed copy) or a
short reason string to drop it. Curation applies filters in order and counts every drop under its reason, so a new
step (language id, quality rules, PII scrubbing) is one more `Filter` subclass added to
the list `filters.build_filters` returns.
"""

from __future__ import annotations

import abc

from lmforge.data.readers import Document


class Filter(abc.ABC):
    """One curation step. `name` identifies it in logs; drop reasons are the strings `apply` returns."""

    name: str = "filter"

    @abc.abstractmethod
    def apply(self, doc: Document) -> Document | str:
        """Return the document to keep (possibly transformed), or a short reason to drop it."""
