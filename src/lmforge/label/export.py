"""A labelling project's votes as preference data: one `lmforge`-format record per comparison that has at least
one vote (lmforge.align.preferences.preference_record), which the reward-model and DPO stages read directly, and
the same as CSV for a spreadsheet (docs/labelling.md, "Export").

A comparison's decision is the most common of its votes when one choice has more votes than any other; a tie
between choices, or a majority for "tie", is exported with `tie: true`, and a majority for "both bad" with
`both_bad: true` (read_preferences drops both unless ties="keep", as it does PandaLM's ties). Attention checks are
not exported: their answers were known before anyone voted. Every vote goes into the record's provenance with its
annotator, time, seconds, note and rubric answers, so a later reader can re-decide with another rule.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.align.preferences import preference_record
from lmforge.io import atomic_open
from lmforge.label.store import LabelStore

CSV_COLUMNS = ("id", "project", "item_id", "model_a", "model_b", "majority", "chosen_model", "rejected_model", "tie",
               "both_bad", "n_votes", "annotators", "prompt", "response_a", "response_b", "votes")  # fmt: skip
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def top_vote(choices: Sequence[str]) -> str | None:
    """The choice with more votes than any other, or None when two or more share the most (or there is none)."""
    if not choices:
        return None
    (top, n), *rest = Counter(choices).most_common()
    return None if rest and rest[0][1] == n else top


def consensus(choices: Sequence[str]) -> str:
    """A comparison's decision: its top vote, or "tie" when there is no majority. Choices are "a", "b", "tie" or
    "both_bad"."""
    if not choices:
        raise ValueError("consensus of no votes: a comparison needs at least one vote to be decided")
    return top_vote(choices) or "tie"


def export_records(store: LabelStore, project: str) -> list[dict[str, Any]]:
    """The `lmforge` records of `project`'s voted comparisons, in serving order."""
    comparisons = [c for c in store.comparisons(project) if not c.is_attention]
    pairs_per_item = Counter(c.item_id for c in comparisons)
    votes = defaultdict(list)
    for vote in store.votes(project):
        if not vote.is_attention:
            votes[vote.comparison_id].append(vote)
    records = []
    for c in comparisons:
        if not votes[c.id]:
            continue
        choice = consensus([v.choice for v in votes[c.id]])
        chosen, rejected = (c.model_b, c.model_a) if choice == "b" else (c.model_a, c.model_b)
        provenance = {
            "source": "human", "project": project, "item_id": c.item_id, "majority": choice,
            "models": {"chosen": chosen, "rejected": rejected, "a": c.model_a, "b": c.model_b},
            "votes": [{"annotator": v.annotator, "choice": v.choice, "at": v.created, "seconds": v.seconds,
                       "note": v.note, "rubric": v.rubric} for v in votes[c.id]],
            "annotators": list(dict.fromkeys(v.annotator for v in votes[c.id])),
        }  # fmt: skip
        # an item with more than two responses makes one record per pair: the models tell them apart
        record_id = c.item_id if pairs_per_item[c.item_id] == 1 else f"{c.item_id}:{c.model_a}-vs-{c.model_b}"
        records.append(preference_record(c.prompt, c.a, c.b, choice, provenance, record_id))
    return records


def export_jsonl(store: LabelStore, project: str, path: str | Path) -> int:
    """Write `project`'s preferences as JSONL at `path`, atomically; returns the number of records."""
    records = export_records(store, project)
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def csv_row(record: dict[str, Any]) -> dict[str, str]:
    """One `lmforge` record flattened to CSV_COLUMNS: the conversation, annotators and votes as JSON text."""
    prov = record["provenance"]
    models = prov["models"]
    a, b = record["chosen"][0]["content"], record["rejected"][0]["content"]
    if prov["majority"] == "b":
        a, b = b, a
    row = {"id": record["id"], "project": prov["project"], "item_id": prov["item_id"], "model_a": models["a"],
           "model_b": models["b"], "majority": prov["majority"], "chosen_model": models["chosen"],
           "rejected_model": models["rejected"], "tie": record["tie"], "both_bad": record["both_bad"],
           "n_votes": len(prov["votes"]), "annotators": json.dumps(prov["annotators"], ensure_ascii=False),
           "prompt": json.dumps(record["prompt"], ensure_ascii=False), "response_a": a, "response_b": b,
           "votes": json.dumps(prov["votes"], ensure_ascii=False)}  # fmt: skip
    return {key: _cell(value) for key, value in row.items()}


def _cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: a model's reply starting with '=' (or '+', '-', '@') would otherwise
    run as a formula when the file is opened, so such a cell gets a leading apostrophe (OWASP's advice)."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def export_csv(store: LabelStore, project: str, path: str | Path) -> int:
    """Write `project`'s preferences as CSV at `path` (one row per voted comparison), atomically; returns the
    number of rows."""
    records = export_records(store, project)
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_row(r) for r in records)
    return len(records)
