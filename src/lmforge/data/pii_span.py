"""The span type shared by pattern PII (lmforge.data.pii) and named-entity PII (lmforge.data.pii_ner), in a module
of its own so that neither imports the other at module level and the import graph stays acyclic."""

from __future__ import annotations

from typing import NamedTuple


class Span(NamedTuple):
    """A half-open character range `[start, end)` of `text` holding one PII item of `kind` (e.g. "EMAIL")."""

    start: int
    end: int
    kind: str
