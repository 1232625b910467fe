"""Small statistics shared by evaluation and fine-tuning (classifier accuracy), kept at the package root so
neither stage package imports the other for it."""

from __future__ import annotations

import math
from typing import Any


def proportion(correct: float, n: int, z: float = 1.959963984540054) -> dict[str, Any]:
    """An accuracy with its standard error and Wilson interval (95% by default; sound near 0 and 1, unlike
    mean +- 2 se). The interval is reported as "ci95" whatever z, since that is what callers display. `correct`
    may be fractional: an estimated rate times n (pass@k)."""
    p = correct / n if n else 0.0
    denom = 1 + z * z / n if n else 1.0
    centre = (p + z * z / (2 * n)) / denom if n else 0.0
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom if n else 0.0
    return {"value": p, "n": n, "stderr": math.sqrt(p * (1 - p) / max(n - 1, 1)),
            "ci95": [max(0.0, centre - half), min(1.0, centre + half)]}  # fmt: skip
