"""Exporting a labelling project (lmforge.label.export): majority per comparison, provenance with every vote, the
`lmforge` records read back by align.preferences.read_preferences, and the CSV flattening."""

from __future__ import annotations

import csv
import json

import pytest
from label_fixtures import checks, click, items, store_with

from lmforge.align.preferences import read_preferences
from lmforge.finetune.data import Message
from lmforge.label.candidates import Candidate, Response
from lmforge.label.export import consensus, export_csv, export_jsonl, export_records

# per item, what annotators ann0, ann1, ann2 choose (a / b in the item's order); p4 is skipped by everyone
PLAN = {"p0": "aaa", "p1": "bba", "p2": "abt", "p3": "xxa"}
LETTERS = {"a": "a", "b": "b", "t": "tie", "x": "both_bad"}


@pytest.fixture
def labelled(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann0", "ann1", "ann2"])
    store.create_project("demo", items(5), k=3, attention=checks(["a"]))
    for n, user in enumerate(users.values()):
        while (a := store.next_assignment("demo", user)) is not None:
            if a.item_id == "p4":
                store.skip(a.id, user)
            elif a.item_id.startswith("check"):
                store.vote(a.id, user, click(a, "a"))
            else:
                store.vote(a.id, user, click(a, LETTERS[PLAN[a.item_id][n]]), note=f"n{n}", seconds=1.0 + n)
    return store


def test_consensus_is_the_unique_most_common_vote():
    assert [consensus(v) for v in (["a"], ["a", "a", "b"], ["b", "b", "a"], ["a", "b"], ["a", "b", "tie"],
                                   ["both_bad", "both_bad", "a"], ["tie", "tie", "b"])] == \
        ["a", "a", "b", "tie", "tie", "both_bad", "tie"]  # fmt: skip
    with pytest.raises(ValueError, match="no votes"):
        consensus([])


def test_one_record_per_voted_comparison_with_every_vote(labelled):
    records = export_records(labelled, "demo")
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3"]  # p4 has no vote, the check is not exported
    decided = {r["id"]: (r["chosen"][0]["content"], r["rejected"][0]["content"], r["tie"], r["both_bad"])
               for r in records}  # fmt: skip
    assert decided == {"p0": ("m1 answers 0", "m2 answers 0", False, False),
                       "p1": ("m2 answers 1", "m1 answers 1", False, False),
                       "p2": ("m1 answers 2", "m2 answers 2", True, False),
                       "p3": ("m1 answers 3", "m2 answers 3", False, True)}  # fmt: skip
    p1 = records[1]
    assert p1["prompt"] == [{"role": "user", "content": "question 1"}]
    prov = p1["provenance"]
    assert (prov["source"], prov["project"], prov["item_id"], prov["majority"]) == ("human", "demo", "p1", "b")
    assert prov["models"] == {"chosen": "m2", "rejected": "m1", "a": "m1", "b": "m2"}
    assert prov["annotators"] == ["ann0", "ann1", "ann2"]
    assert [(v["annotator"], v["choice"], v["seconds"], v["note"]) for v in prov["votes"]] == \
        [("ann0", "b", 1.0, "n0"), ("ann1", "b", 2.0, "n1"), ("ann2", "a", 3.0, "n2")]  # fmt: skip
    assert all(v["at"].endswith("+00:00") for v in prov["votes"])


def test_the_jsonl_export_is_read_back_by_read_preferences(labelled, tmp_path):
    path = tmp_path / "out" / "prefs.jsonl"
    assert export_jsonl(labelled, "demo", path) == 4
    pairs, skipped = read_preferences(path)
    assert [(p.id, p.chosen, p.rejected, p.tie) for p in pairs] == \
        [("p0", "m1 answers 0", "m2 answers 0", False), ("p1", "m2 answers 1", "m1 answers 1", False)]  # fmt: skip
    assert pairs[0].prompt == [Message("user", "question 0")]
    assert skipped.count == 2 and set(skipped.by_reason) == {"tie", "both bad"}  # dropped as PandaLM's ties are
    kept, skipped = read_preferences(path, ties="keep")
    assert [(p.id, p.tie) for p in kept] == [("p0", False), ("p1", False), ("p2", True), ("p3", True)]
    assert skipped.count == 0
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]  # written atomically, no temp file left


def test_the_csv_has_one_row_per_record_with_the_same_fields(labelled, tmp_path):
    path = tmp_path / "prefs.csv"
    assert export_csv(labelled, "demo", path) == 4
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    records = export_records(labelled, "demo")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    p2 = rows[2]
    assert (p2["majority"], p2["tie"], p2["both_bad"], p2["n_votes"]) == ("tie", "true", "false", "3")
    assert (p2["response_a"], p2["response_b"], p2["model_a"], p2["model_b"]) == \
        ("m1 answers 2", "m2 answers 2", "m1", "m2")  # fmt: skip
    assert (rows[1]["response_a"], rows[1]["chosen_model"]) == ("m1 answers 1", "m2")  # a stays a when b wins
    assert json.loads(p2["votes"]) == records[2]["provenance"]["votes"]
    assert json.loads(p2["annotators"]) == ["ann0", "ann1", "ann2"]
    assert json.loads(p2["prompt"]) == [{"role": "user", "content": "question 2"}]


def test_items_with_more_replies_export_one_record_per_pair_and_formulas_stay_text(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann"])
    item = Candidate("q", [Message("user", "sum?")], [Response("x", "=1+1"), Response("y", "2"), Response("z", "@3")])
    store.create_project("demo", [item], k=1)
    while (a := store.next_assignment("demo", users["ann"])) is not None:
        store.vote(a.id, users["ann"], click(a, "a"))
    records = export_records(store, "demo")
    assert [r["id"] for r in records] == ["q:x-vs-y", "q:x-vs-z", "q:y-vs-z"]
    export_csv(store, "demo", tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["response_a"], r["response_b"]) for r in rows] == [("'=1+1", "2"), ("'=1+1", "'@3"), ("2", "'@3")]
    assert records[0]["chosen"][0]["content"] == "=1+1"  # the JSONL keeps the text exactly
