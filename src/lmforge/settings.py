"""The base of every settings section: a pydantic model that refuses unknown keys and re-checks assigned values.

Each stage's settings live beside its code (lmforge.data.config, lmforge.train.config, ...); lmforge.recipe
assembles them into the recipe schema from the stage registry (lmforge.registry).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Settings that change how fast or how often, never what a stage produces: fingerprints leave them out, so
    # changing them neither re-runs a stage nor restarts a job.
    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset()

    def semantic(self) -> dict[str, Any]:
        """The settings that decide what a stage produces (sub-sections too), as plain JSON values."""
        out: dict[str, Any] = {}
        for key in type(self).model_fields:
            if key in self.NON_SEMANTIC:
                continue
            value = getattr(self, key)
            out[key] = value.semantic() if isinstance(value, Section) else _json(value)
        return out


def _json(value: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(Any).dump_python(value, mode="json")
