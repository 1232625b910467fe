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
        values = self.model_dump(mode="json")
        return {key: value.semantic() if isinstance(value := getattr(self, key), Section) else values[key]
                for key in type(self).model_fields if key not in self.NON_SEMANTIC}  # fmt: skip
