"""The results of a project as tables: one shape for the web page (results.html) and the terminal (`lmforge label
results`), built from whatever `label.results.project_results` returns, so a statistic added there shows in both
without a change here. Numbers are formatted once, in `cell`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


def cell(value: Any) -> str:
    """One value as text: floats to 3 decimals, NaN as "undefined" (a kappa whose chance agreement is 1), an
    interval (a pair of numbers) as "[lo, hi]", a missing value as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "undefined" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(cell(v) for v in value)
        return f"[{inner}]" if len(value) == 2 and all(isinstance(v, (int, float)) for v in value) else inner
    if isinstance(value, dict):
        return ", ".join(f"{k}: {cell(v)}" for k, v in value.items())
    return str(value)


def _is_record(value: Any) -> bool:
    """A dict of plain values: one row of a table."""
    return isinstance(value, dict) and not any(isinstance(v, dict) for v in value.values())


def _rows_table(title: str, key_name: str, records: list[tuple[str | None, dict[str, Any]]]) -> Table:
    columns: list[str] = []
    for _, record in records:
        columns += [c for c in record if c not in columns]
    keyed = any(key is not None for key, _ in records)
    rows = [([key or ""] if keyed else []) + [cell(record.get(c)) for c in columns] for key, record in records]
    return Table(title, ([key_name] if keyed else []) + columns, rows)


def _tables(title: str, value: Any, out: list[Table]) -> None:
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        if all(_is_record(v) for v in value.values()):
            out.append(_rows_table(title, "", [(str(k), v) for k, v in value.items()]))
        else:
            for key, inner in value.items():
                _tables(f"{title} / {key}", inner, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out.append(_rows_table(title, "", [(None, v) for v in value]))
    elif isinstance(value, dict):
        out.append(Table(title, ["", "value"], [[str(k), cell(v)] for k, v in value.items()]))
    else:
        out.append(Table(title, ["value"], [[cell(value)]]))


def _ratings_table(bt: dict[str, Any], elo: dict[str, Any]) -> Table:
    """Bradley-Terry ratings with their 95% intervals beside online Elo, one row per model, best first."""
    models = sorted(bt["rating"], key=lambda m: -bt["rating"][m])
    rows = [[m, cell(bt["rating"][m]), cell(bt.get("ci95", {}).get(m)), cell(elo.get(m))] for m in models]
    title = f"ratings ({bt['n_comparisons']} comparisons)" if "n_comparisons" in bt else "ratings"
    return Table(title, ["model", "Bradley-Terry", "95% interval", "Elo"], rows)


def results_tables(results: dict[str, Any]) -> list[Table]:
    """The tables of a results dict: its plain top-level values in one "summary" table first, the ratings
    (`bradley_terry` with `rating` and `ci95` per model, and `elo`) in one table, then one table per mapping of
    records (row per key) or list of records, nested mappings titled "outer / inner". Empty ones are left out."""
    plain = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}
    summary = [[k.replace("_", " "), cell(v)] for k, v in plain.items()]
    tables = [Table("summary", ["", "value"], summary)] if plain else []
    rest = {k: v for k, v in results.items() if k not in plain and v}
    bt = rest.get("bradley_terry")
    if isinstance(bt, dict) and isinstance(bt.get("rating"), dict):
        tables.append(_ratings_table(rest.pop("bradley_terry"), rest.pop("elo", None) or {}))
    for key, value in rest.items():
        _tables(key.replace("_", " "), value, tables)
    return tables


def tables_text(tables: list[Table]) -> str:
    """Aligned plain-text tables for the terminal, each under its title."""
    blocks = []
    for table in tables:
        grid = [table.columns, *table.rows]
        widths = [max(len(row[i]) for row in grid) for i in range(len(table.columns))]
        lines = ["  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in grid]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join([table.title, *lines]))
    return "\n\n".join(blocks) + "\n"
