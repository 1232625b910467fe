"""The labelling store (lmforge.label.store, accounts, db): assignment to k distinct annotators, the blind
left/right flip, votes, skip, undo, leases, hashed tokens, sessions and schema migrations."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter

import pytest
from label_fixtures import checks, items, label_all, store_with

from lmforge.align.preferences import preference_record
from lmforge.finetune.data import Message, Skipped
from lmforge.label import db
from lmforge.label.candidates import Candidate
from lmforge.label.records import is_flipped, serving_order, sha256
from lmforge.label.store import LabelStore, Progress


def test_each_comparison_goes_to_k_distinct_annotators_and_attention_checks_to_all(tmp_path):
    store, users = store_with(tmp_path / "l.db", [f"u{i}" for i in range(5)])
    project = store.create_project("demo", items(4, ("m1", "m2", "m3")), k=2, attention=checks(["a", "b"]))
    assert (project.items, project.comparisons, project.attention, project.k) == (4, 12, 2, 2)
    cast = {name: label_all(store, "demo", u, lambda a: "left") for name, u in users.items()}
    votes = store.votes("demo")
    per_comparison = Counter(v.comparison_id for v in votes if not v.is_attention)
    assert len(per_comparison) == 12 and set(per_comparison.values()) == {2}
    assert len({(v.comparison_id, v.annotator) for v in votes}) == len(votes)  # nobody voted twice on one
    # every annotator got both attention checks; the 24 regular slots were filled in serving order
    assert Counter(v.annotator for v in votes if v.is_attention) == {name: 2 for name in users}
    assert sum(cast.values()) == 24 + 5 * 2
    for name, user in users.items():
        assert store.progress("demo", user).done == store.progress("demo", user).total == cast[name]


def test_an_annotator_never_gets_a_comparison_twice_and_the_database_enforces_it(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann"])
    store.create_project("demo", items(3), k=3)
    seen = []
    while (a := store.next_assignment("demo", users["ann"])) is not None:
        seen.append(a.comparison_id)
        store.vote(a.id, users["ann"], "tie")
    assert sorted(seen) == [1, 2, 3]  # each once, though each still has room for two more annotators
    with sqlite3.connect(tmp_path / "l.db") as c, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        c.execute("INSERT INTO assignments (comparison_id, user_id, flipped, created, opened, expires, state) "
                  "VALUES (1, 1, 0, '', 0, 0, 'open')")  # fmt: skip


def test_the_open_assignment_comes_back_on_reload_with_the_same_sides(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann"])
    store.create_project("demo", items(3), k=1, seed=7)
    first = store.next_assignment("demo", users["ann"])
    again = store.next_assignment("demo", users["ann"])
    assert (again.id, again.left, again.right, again.flipped) == (first.id, first.left, first.right, first.flipped)
    assert (first.position, first.total, first.item_id, first.project) == (1, 3, "p0", "demo")
    assert first.prompt == [Message("user", "question 0")]
    assert first.flipped == is_flipped(7, first.comparison_id, users["ann"].id)
    assert {first.left, first.right} == {"m1 answers 0", "m2 answers 0"}
    assert (first.left == "m2 answers 0") == first.flipped


def test_the_flip_is_a_stable_hash_about_half_flipped():
    flips = [is_flipped(0, c, u) for c in range(1, 101) for u in range(1, 21)]
    assert 0.45 < sum(flips) / len(flips) < 0.55
    assert flips == [is_flipped(0, c, u) for c in range(1, 101) for u in range(1, 21)]
    assert [is_flipped(1, c, 1) for c in range(1, 101)] != [is_flipped(0, c, 1) for c in range(1, 101)]


@pytest.mark.parametrize("clicked", ["left", "right", "tie", "both_bad"])
def test_a_vote_is_stored_in_item_order_and_reveals_the_models(tmp_path, clicked):
    store, users = store_with(tmp_path / "l.db", [f"u{i}" for i in range(6)])
    store.create_project("demo", items(1), k=6)
    for user in users.values():  # six annotators: both sides of the flip occur (u1/u2 are flipped, u0 is not)
        a = store.next_assignment("demo", user)
        result = store.vote(a.id, user, clicked, note="why", rubric={"helpful": "left", "honest": ""}, seconds=2.5)
        shown = ("m2", "m1") if a.flipped else ("m1", "m2")
        assert (result.left_model, result.right_model) == shown
        side = {"left": shown[0], "right": shown[1]}
        expected = {"m1": "a", "m2": "b"}[side[clicked]] if clicked in side else clicked
        assert result.choice == expected
        row = store.votes("demo")[-1]
        assert (row.choice, row.annotator, row.note, row.seconds) == (expected, user.name, "why", 2.5)
        assert row.rubric == {"helpful": {"m1": "a", "m2": "b"}[shown[0]]}
    assert {is_flipped(0, 1, u.id) for u in users.values()} == {True, False}


def test_bad_votes_are_refused_and_change_nothing(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann", "other"])
    store.create_project("demo", items(2), k=2)
    a = store.next_assignment("demo", users["ann"])
    with pytest.raises(ValueError, match="choice 'a'"):
        store.vote(a.id, users["ann"], "a")
    with pytest.raises(ValueError, match="rubric dimensions \\['fun'\\]"):
        store.vote(a.id, users["ann"], "left", rubric={"fun": "left"})
    with pytest.raises(PermissionError, match="another annotator"):
        store.vote(a.id, users["other"], "left")
    with pytest.raises(KeyError, match="no assignment 99"):
        store.vote(99, users["ann"], "left")
    assert store.votes("demo") == []
    store.vote(a.id, users["ann"], "left")
    with pytest.raises(ValueError, match="has its vote already"):
        store.vote(a.id, users["ann"], "right")
    assert [v.choice for v in store.votes("demo")] == ["b" if a.flipped else "a"]


def test_an_expired_lease_frees_the_slot(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["slow", "fast"], lease_s=0.2)
    store.create_project("demo", items(1), k=1)
    held = store.next_assignment("demo", users["slow"])
    assert store.next_assignment("demo", users["fast"]) is None  # the only slot is reserved
    time.sleep(0.3)
    taken = store.next_assignment("demo", users["fast"])
    assert taken.comparison_id == held.comparison_id
    with pytest.raises(ValueError, match="lease ran out"):  # k would be exceeded: the late vote is refused
        store.vote(held.id, users["slow"], "left")
    assert store.next_assignment("demo", users["slow"]) is None  # and the late annotator is not offered it again
    store.vote(taken.id, users["fast"], "right")
    assert [v.annotator for v in store.votes("demo")] == ["fast"]


def test_a_late_vote_counts_when_the_slot_is_still_free(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["slow"], lease_s=0.05)
    store.create_project("demo", items(1), k=1)
    held = store.next_assignment("demo", users["slow"])
    time.sleep(0.1)
    store.vote(held.id, users["slow"], "tie")
    assert [v.choice for v in store.votes("demo")] == ["tie"]


def test_skip_frees_the_slot_and_is_never_offered_again(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann", "other"])
    store.create_project("demo", items(2), k=1)
    a = store.next_assignment("demo", users["ann"])
    store.skip(a.id, users["ann"])
    with pytest.raises(ValueError, match="is skipped"):
        store.vote(a.id, users["ann"], "left")
    b = store.next_assignment("demo", users["ann"])
    assert b.comparison_id != a.comparison_id
    store.vote(b.id, users["ann"], "left")
    assert store.next_assignment("demo", users["ann"]) is None
    assert store.progress("demo", users["ann"]) == Progress(1, 1)
    assert store.next_assignment("demo", users["other"]).comparison_id == a.comparison_id  # the freed slot


def test_undo_removes_the_last_vote_and_next_returns_it_first(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann", "other"])
    store.create_project("demo", items(3), k=1)
    ann = users["ann"]
    assert store.undo_last("demo", ann) is None
    first = store.next_assignment("demo", ann)
    store.vote(first.id, ann, "left")
    showing = store.next_assignment("demo", ann)  # the page now shows the second comparison
    reopened = store.undo_last("demo", ann)
    assert (reopened.id, reopened.position) == (first.id, 1)
    assert store.votes("demo") == []
    assert store.next_assignment("demo", ann).id == first.id  # before the page that was open
    assert store.next_assignment("demo", users["other"]).comparison_id not in (first.comparison_id,
                                                                               showing.comparison_id)  # fmt: skip
    store.vote(first.id, ann, "right")
    assert store.next_assignment("demo", ann).id == showing.id
    assert [v.choice for v in store.votes("demo")] == ["a" if first.flipped else "b"]


def test_attention_checks_are_spread_evenly():
    assert serving_order(6, 2) == [0, 1, None, 2, 3, None, 4, 5]
    assert serving_order(3, 0) == [0, 1, 2]
    assert serving_order(1, 2) == [None, 0, None]
    assert sorted(i for i in serving_order(100, 7) if i is not None) == list(range(100))


def test_create_project_refuses_what_it_cannot_label(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann"])
    with pytest.raises(ValueError, match="item id 'p0' appears twice"):
        store.create_project("demo", items(2) + items(1))
    unlabelled = Candidate("x", [Message("user", "q")], items(1)[0].responses)
    with pytest.raises(ValueError, match="attention item 'x'.*needs its answer"):
        store.create_project("demo", items(1), attention=[unlabelled])
    with pytest.raises(ValueError, match="project name 'a/b'"):
        store.create_project("a/b", items(1))
    store.create_project("demo", items(1))
    with pytest.raises(ValueError, match="already exists"):
        store.create_project("demo", items(1))
    with pytest.raises(KeyError, match="no project 'nope'"):
        store.next_assignment("nope", users["ann"])
    assert [p.name for p in store.projects()] == ["demo"]


def test_tokens_are_stored_only_as_hashes(tmp_path):
    store, _ = store_with(tmp_path / "l.db", [])
    token = store.add_user("alice", role="admin")
    session, csrf = store.create_session(store.user_by_token(token))
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("l.db*"))  # the file and its WAL
    assert token.encode() not in stored and session.encode() not in stored
    assert sha256(token).encode() in stored  # what is kept is the hash the lookups use
    assert len(token) >= 43  # 32 random bytes, URL-safe base64
    assert store.user_by_token(token).role == "admin"
    assert store.user_by_token(token + "x") is None and store.user_by_token("") is None
    assert store.session(session).csrf == csrf


def test_rotating_or_disabling_ends_the_old_token_and_sessions(tmp_path):
    store, _ = store_with(tmp_path / "l.db", [])
    old = store.add_user("bob")
    session, _ = store.create_session(store.user_by_token(old))
    new = store.rotate_token("bob")
    assert store.user_by_token(old) is None and store.session(session) is None
    assert store.user_by_token(new).name == "bob"
    session, _ = store.create_session(store.user_by_token(new))
    store.disable_user("bob")
    assert store.user_by_token(new) is None and store.session(session) is None
    assert [(u.name, u.disabled) for u in store.users()] == [("bob", True)]
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("bob")
    with pytest.raises(KeyError, match="no user 'carol'"):
        store.rotate_token("carol")


def test_sessions_end_and_expire(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann"])
    token, csrf = store.create_session(users["ann"])
    assert store.session(token).user == users["ann"] and store.session(token).csrf == csrf
    store.end_session(token)
    assert store.session(token) is None
    short = LabelStore(tmp_path / "l.db", session_s=0.05)
    token, _ = short.create_session(users["ann"])
    time.sleep(0.1)
    assert short.session(token) is None


def test_connections_use_wal_full_sync_and_foreign_keys(tmp_path):
    LabelStore(tmp_path / "l.db", create=True)
    conn = db.connect(tmp_path / "l.db")
    pragmas = [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in
               ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "user_version")]  # fmt: skip
    assert pragmas == ["wal", 2, 10000, 1, db.VERSION]


def test_a_version_1_file_migrates_on_open_and_keeps_its_data(tmp_path):
    path = tmp_path / "old.db"
    conn = db.connect(path)
    db.migrate(conn, path, target=1)  # the schema as the first release wrote it
    conn.execute("INSERT INTO users (name, role, token_sha256, created) VALUES ('old', 'annotator', 'h', 'then')")
    conn.close()
    assert "judge_votes" not in _tables(path)
    store = LabelStore(path)
    assert [u.name for u in store.users()] == ["old"]
    assert "judge_votes" in _tables(path)
    assert db.user_version(db.connect(path)) == db.VERSION == len(db.MIGRATIONS)
    store.create_project("demo", items(1, ("m1", "m2")))
    record = preference_record([Message("user", "question 0")], "m2 answers 0", "m1 answers 0", "a",
                               {"source": "judge:len", "item_id": "p0", "models": {"chosen": "m2", "rejected": "m1"}})
    assert store.add_judge_votes("demo", "len", [record]) == 1


def test_a_failing_migration_leaves_the_file_at_its_old_version(tmp_path, monkeypatch):
    path = tmp_path / "l.db"
    LabelStore(path, create=True)
    broken = "CREATE TABLE extra (a INTEGER); INSERT INTO no_such_table VALUES (1)"
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, broken])
    monkeypatch.setattr(db, "VERSION", len(db.MIGRATIONS))
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        LabelStore(path)
    assert db.user_version(db.connect(path)) == len(db.MIGRATIONS) - 1
    assert "extra" not in _tables(path)  # the first statement was rolled back with the second


def test_a_newer_file_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "new.db"
    LabelStore(path, create=True)
    with sqlite3.connect(path) as c:
        c.execute(f"PRAGMA user_version = {db.VERSION + 5}")
    with pytest.raises(db.SchemaError, match=f"schema version {db.VERSION + 5}, newer than this lmforge's "
                                             f"{db.VERSION}"):  # fmt: skip
        LabelStore(path)
    with pytest.raises(FileNotFoundError, match="lmforge label init"):
        LabelStore(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_judge_votes_match_comparisons_by_item_and_models(tmp_path):
    store, _ = store_with(tmp_path / "l.db", [])
    store.create_project("demo", items(2))
    prompt = [Message("user", "q")]

    def record(item, chosen, rejected, choice="a"):
        return preference_record(prompt, "x", "y", choice, {"source": "judge:j", "item_id": item,
                                                             "models": {"chosen": chosen, "rejected": rejected}})

    skipped = Skipped()
    records = [record("p0", "m2", "m1"), record("p1", "m1", "m2", "tie"), record("p9", "m1", "m2"), {"x": 1}]
    assert store.add_judge_votes("demo", "j", records, skipped) == 2
    assert skipped.count == 2 and set(skipped.by_reason) == {"no comparison", "no provenance"}
    assert [(r.comparison_id, r.choice) for r in store.judge_votes("demo")] == [(1, "b"), (2, "tie")]
    assert store.add_judge_votes("demo", "j", [record("p0", "m1", "m2", "both_bad")]) == 1  # replaces its vote
    assert [(r.comparison_id, r.choice) for r in store.judge_votes("demo")] == [(1, "both_bad"), (2, "tie")]
    assert store.judge_votes("demo")[0].detail["item_id"] == "p0"


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
