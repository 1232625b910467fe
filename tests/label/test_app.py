"""The labelling app's pages over a real store: the blind A/B page and its reveal, progress, votes with note,
rubric and time, skip, undo, double votes, unknown projects, the results page and the exports (app.py, pages.py)."""

from __future__ import annotations

import json
import re
import time

import pytest
from webapp import MODELS, PROJECT, client, element_text, hidden, items, login, make_db, vote

from lmforge.align.preferences import read_preferences
from lmforge.label.pages import Table, results_tables, tables_text


def _page(c) -> str:
    r = c.get(f"/p/{PROJECT}")
    assert r.status_code == 200
    return r.text


def test_the_page_is_blind_until_the_vote_then_reveals_the_sides(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    page = _page(c)
    assert not any(model in page for model in MODELS)
    assert "reveal" not in page
    left, right = element_text(page, "left"), element_text(page, "right")
    assert element_text(page, "prompt").strip().endswith("question 0")
    assert {left, right} == {"reply 0 number 0", "reply 0 number 1"}
    shown_models = [MODELS[int(text[-1])] for text in (left, right)]  # "reply 0 number J" is model J's

    r = vote(c, csrf, "left")
    assignment = hidden(page, "assignment")
    assert r.status_code == 303 and r.headers["location"] == f"/p/{PROJECT}?revealed={assignment}"
    after = c.get(r.headers["location"]).text
    assert element_text(after, "reveal").split("Next")[0].strip() == (
        f"Your vote is saved. A was {shown_models[0]}, B was {shown_models[1]}.")
    # the next item is shown blind under the reveal: no model name outside #reveal
    outside = re.sub(r'<p id="reveal".*?</p>', "", after, flags=re.S)
    assert not any(model in outside for model in MODELS)
    assert "reveal" not in _page(c)  # the reveal is shown once, after the vote
    # "A better" is stored in the item's own order: the model that was on the left won
    [row] = store.votes(PROJECT)
    winner = row.model_a if row.choice == "a" else row.model_b
    assert row.choice in ("a", "b") and winner == shown_models[0]


def test_a_reveal_is_only_for_the_user_who_voted(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db")
    first, second = client(tmp_path / "l.db"), client(tmp_path / "l.db")
    location = vote(first, login(first, tokens["ann1"])).headers["location"]
    login(second, tokens["ann2"])
    page = second.get(location).text
    assert 'id="reveal"' not in page and not any(model in page for model in MODELS)


def test_progress_counts_votes_of_the_total(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db", items(3))
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    for done in range(3):
        page = _page(c)
        assert element_text(page, "progress") == f"{done} / 3"
        assert f'<progress value="{done}" max="3">' in page
        assert vote(c, csrf, "tie").status_code == 303
    page = _page(c)
    assert element_text(page, "progress") == "3 / 3"
    assert "Nothing left for you" in element_text(page, "done")
    assert 'id="vote-form"' not in page and 'id="skip"' not in page
    assert "<td>3 / 3</td>" in c.get("/").text  # the projects page shows the same progress


def test_vote_keeps_note_rubric_and_seconds(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    flipped = element_text(_page(c), "left") == "reply 0 number 1"  # model 1 (b) shown on the left
    r = vote(c, csrf, "right", note="  too long  ", rubric_helpful="left", rubric_harmless="tie", seconds="4.25")
    assert r.status_code == 303
    [row] = store.votes(PROJECT)
    assert row.choice == ("a" if flipped else "b")
    assert row.note == "too long"
    assert row.rubric == {"helpful": "b" if flipped else "a", "harmless": "tie"}
    assert row.seconds == 4.25


def test_without_javascript_the_server_times_the_item(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    vote(c, csrf, "left", shown=str(time.time() - 7))
    vote(c, csrf, "left", shown="not a time")
    first, second = store.votes(PROJECT)
    assert 7 <= first.seconds < 9
    assert second.seconds is None


def test_bad_choice_or_rubric_is_400(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    assert vote(c, csrf, "model-a").status_code == 400
    assert vote(c, csrf, "left", rubric_helpful="a").status_code == 400
    r = c.post(f"/p/{PROJECT}/vote", data={"assignment": "x", "choice": "left", "csrf": csrf})
    assert r.status_code == 400 and "field &#39;assignment&#39; must be a whole number" in r.text
    assert store.votes(PROJECT) == []


def test_double_vote_is_409_and_stores_one(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    assignment = hidden(_page(c), "assignment")
    form = {"assignment": assignment, "choice": "left", "csrf": csrf}
    assert c.post(f"/p/{PROJECT}/vote", data=form).status_code == 303
    again = c.post(f"/p/{PROJECT}/vote", data={**form, "choice": "right"})
    assert again.status_code == 409 and "already" in again.text
    assert [v.choice for v in store.votes(PROJECT)] != [] and len(store.votes(PROJECT)) == 1


def test_another_annotators_assignment_is_403(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    first, second = client(tmp_path / "l.db"), client(tmp_path / "l.db")
    login(first, tokens["ann1"])
    theirs = hidden(_page(first), "assignment")
    csrf = login(second, tokens["ann2"])
    r = second.post(f"/p/{PROJECT}/vote", data={"assignment": theirs, "choice": "left", "csrf": csrf})
    assert r.status_code == 403
    assert second.post(f"/p/{PROJECT}/vote", data={"assignment": "999", "choice": "left",
                                                    "csrf": csrf}).status_code == 404  # fmt: skip
    assert store.votes(PROJECT) == []


def test_undo_reopens_the_last_vote(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    first = hidden(_page(c), "assignment")
    vote(c, csrf, "left")
    assert element_text(_page(c), "progress") == "1 / 3"
    r = c.post(f"/p/{PROJECT}/undo", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == f"/p/{PROJECT}"
    page = _page(c)
    assert hidden(page, "assignment") == first  # the undone item comes back
    assert element_text(page, "progress") == "0 / 3"
    assert store.votes(PROJECT) == []
    assert vote(c, csrf, "right").status_code == 303  # and takes a new vote
    assert len(store.votes(PROJECT)) == 1


def test_skip_moves_on_and_never_offers_the_item_again(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db", items(2))
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    skipped = hidden(_page(c), "assignment")
    r = c.post(f"/p/{PROJECT}/skip", data={"assignment": skipped, "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == f"/p/{PROJECT}"
    page = _page(c)
    assert hidden(page, "assignment") != skipped
    assert element_text(page, "prompt").strip().endswith("question 1")
    vote(c, csrf, "left")
    assert 'id="done"' in _page(c)  # the skipped item is not offered again
    assert c.post(f"/p/{PROJECT}/skip", data={"assignment": skipped, "csrf": csrf}).status_code == 409


def test_unknown_project_is_404_naming_it(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["admin"])
    for r in (c.get("/p/nosuch"), c.get("/p/nosuch/results"), c.get("/p/nosuch/export.csv"),
              c.post("/p/nosuch/vote", data={"assignment": "1", "choice": "left", "csrf": csrf})):  # fmt: skip
        assert r.status_code == 404
        assert "no project named &#39;nosuch&#39;" in r.text


def test_results_page_shows_the_tables_and_export_links(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db", items(3))
    for name in ("ann1", "ann2"):
        c = client(tmp_path / "l.db")
        csrf = login(c, tokens[name])
        for _ in range(3):
            vote(c, csrf, "left")
    admin = client(tmp_path / "l.db")
    login(admin, tokens["admin"])
    page = admin.get(f"/p/{PROJECT}/results").text
    assert f'href="/p/{PROJECT}/export.jsonl"' in page and f'href="/p/{PROJECT}/export.csv"' in page
    assert page.count("<table") >= 2
    for model in MODELS:  # the ratings name the models
        assert model in page
    assert "ann1" in page and "ann2" in page  # per-annotator statistics


def test_exports_download_what_read_preferences_reads(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db", items(2), k=1)
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    vote(c, csrf, "left")
    vote(c, csrf, "tie")
    login(c, tokens["admin"])
    r = c.get(f"/p/{PROJECT}/export.jsonl")
    assert r.status_code == 200
    assert r.headers["content-disposition"] == f'attachment; filename="{PROJECT}.jsonl"'
    records = [json.loads(line) for line in r.text.splitlines()]
    assert sorted(rec["tie"] for rec in records) == [False, True]
    (tmp_path / "out.jsonl").write_bytes(r.content)
    pairs, skipped = read_preferences(tmp_path / "out.jsonl", ties="keep")
    assert len(pairs) == 2 and skipped.count == 0
    assert sum(p.tie for p in pairs) == 1
    csv = c.get(f"/p/{PROJECT}/export.csv")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert len(csv.text.strip().splitlines()) == 3  # a header and the two comparisons


def test_results_tables_shape_any_results_dict() -> None:
    results = {"n_votes": 12, "fleiss_kappa": 0.41234, "alpha": float("nan"),
               "bradley_terry": {"rating": {"dpo": 987.6, "sft": 1012.3456},
                                 "ci95": {"sft": [990.0, 1030.5], "dpo": [960.25, 1001.0]}, "n_comparisons": 9},
               "elo": {"sft": 1003.0, "dpo": 997.0},
               "by_judge": {"length": {"accuracy": 0.5, "kappa": None}, "llm": {"accuracy": 0.75, "kappa": 0.25}},
               "pairwise_kappa": [{"a": "ann1", "b": "ann2", "kappa": 0.5, "n_items": 4}],
               "judges": []}  # fmt: skip
    tables = results_tables(results)
    assert tables == [
        Table("summary", ["", "value"], [["n votes", "12"], ["fleiss kappa", "0.412"], ["alpha", "undefined"]]),
        Table("ratings (9 comparisons)", ["model", "Bradley-Terry", "95% interval", "Elo"],
              [["sft", "1012.346", "[990.000, 1030.500]", "1003.000"],
               ["dpo", "987.600", "[960.250, 1001.000]", "997.000"]]),
        Table("by judge", ["", "accuracy", "kappa"], [["length", "0.500", "-"], ["llm", "0.750", "0.250"]]),
        Table("pairwise kappa", ["a", "b", "kappa", "n_items"], [["ann1", "ann2", "0.500", "4"]]),
    ]  # the empty "judges" is left out
    text = tables_text(tables[3:])
    assert text == ("pairwise kappa\na     b     kappa  n_items\n----  ----  -----  -------\n"
                    "ann1  ann2  0.500  4\n")


@pytest.mark.parametrize("path", ["/static/label.js", "/static/label.css"])
def test_static_files_are_served(tmp_path, path) -> None:
    make_db(tmp_path / "l.db")
    r = client(tmp_path / "l.db").get(path)
    assert r.status_code == 200 and len(r.content) > 500
