"""What every stage's report section uses: number formatting, tables, JSON lines and the training curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.io import atomic_open


def fmt(value: Any, spec: str = ".4g") -> str:
    """A metric for the report: "—" when missing, floats with `spec`, counts with thousands separators."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"  # counts of documents, bytes, tokens, parameters
    return str(value)


def load_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curve(metrics_path: Path, out_png: Path) -> bool:
    """Training loss per step and validation loss where measured; returns False when there is nothing to plot."""
    records = load_jsonl(metrics_path)
    steps = [r["step"] for r in records if "loss" in r]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], lw=1, alpha=0.8, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", lw=2, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True
