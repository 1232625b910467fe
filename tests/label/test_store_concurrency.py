"""The labelling store under concurrent annotators: 32 threads, each its own user and its own LabelStore (so its
own SQLite connections), asking for work and voting at once. Nothing is lost, duplicated or over-assigned."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter

from label_fixtures import items, store_with

from lmforge.label.store import LabelStore

THREADS = 32


def _run(workers) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(work):
        try:
            work()
        except BaseException as e:  # re-raised by the test, so a failing thread fails it
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return errors


def test_32_annotators_at_once_fill_every_comparison_exactly_k_times(tmp_path):
    path = tmp_path / "l.db"
    k, n_items = 3, 20
    _, users = store_with(path, [f"ann{i:02d}" for i in range(THREADS)])
    LabelStore(path).create_project("demo", items(n_items), k=k)
    start = threading.Barrier(THREADS)
    cast: Counter[str] = Counter()

    def annotate(user):
        store = LabelStore(path)  # each thread its own store object and connections
        start.wait()
        while (assignment := store.next_assignment("demo", user)) is not None:
            store.vote(assignment.id, user, ("left", "right", "tie")[assignment.comparison_id % 3])
            cast[user.name] += 1

    assert _run([lambda u=u: annotate(u) for u in users.values()]) == []
    votes = LabelStore(path).votes("demo")
    assert len(votes) == sum(cast.values()) == n_items * k
    assert set(Counter(v.comparison_id for v in votes).values()) == {k}
    assert len({(v.comparison_id, v.annotator) for v in votes}) == len(votes)
    with sqlite3.connect(path) as c:
        states = dict(c.execute("SELECT state, COUNT(*) FROM assignments GROUP BY state").fetchall())
    assert states == {"voted": n_items * k}  # no reservation was left behind or handed out twice


def test_the_last_slot_goes_to_exactly_one_of_32_simultaneous_requests(tmp_path):
    path = tmp_path / "l.db"
    _, users = store_with(path, [f"ann{i:02d}" for i in range(THREADS)])
    LabelStore(path).create_project("demo", items(1), k=1)
    start = threading.Barrier(THREADS)
    got = []

    def ask(user):
        store = LabelStore(path)
        start.wait()
        if (assignment := store.next_assignment("demo", user)) is not None:
            got.append((user.name, assignment.comparison_id))

    assert _run([lambda u=u: ask(u) for u in users.values()]) == []
    assert len(got) == 1
