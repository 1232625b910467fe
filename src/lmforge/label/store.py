"""The labelling store: projects of comparisons and the assignments and votes of blind pairwise labelling, in one
SQLite file (lmforge.label.db; docs/labelling.md, "Storage"). Users, tokens and sessions are lmforge.label.accounts'.

Every public method opens its own connection and closes it before returning, so one LabelStore may be shared by
threads. Every write is one BEGIN IMMEDIATE transaction committed before the method returns: a vote the web app
acknowledges is on disk. The issue's guarantees are the database's own constraints and transactions:
- no annotator sees a comparison twice: UNIQUE (comparison_id, user_id) on assignments;
- no comparison gets more than k votes: a comparison is reserved only inside the write transaction that counts its
  votes and live reservations (fewer than k) and inserts the reservation, so two annotators asking at the same
  moment cannot both take the last slot; a reservation not voted on within `lease_s` frees its slot;
- one vote per assignment: UNIQUE (assignment_id) on votes.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.finetune.data import Skipped
from lmforge.label import db
from lmforge.label.accounts import NAME, SESSION_S, Accounts
from lmforge.label.candidates import LABELS, Candidate, pairs_of
from lmforge.label.records import (Assignment, ComparisonRow, JudgeVoteRow, Progress, Project, Session, User,
                                   VoteResult, VoteRow, conversation, is_flipped, now_iso, serving_order)  # fmt: skip

__all__ = ["Assignment", "ComparisonRow", "JudgeVoteRow", "LabelStore", "Progress", "Project", "Session", "User",
           "VoteResult", "VoteRow"]  # fmt: skip

log = logging.getLogger(__name__)

CHOICES = ("left", "right", "tie", "both_bad")  # what the annotator clicks
RUBRIC_CHOICES = ("left", "right", "tie")
LEASE_S = 1800.0
# A comparison has room when its votes plus live reservations (assignments voted, or open and unexpired, other
# than :exclude) fall short of k. Attention checks have no cap: every annotator gets each one.
def _taken(comparison: str) -> str:
    return (f"SELECT COUNT(*) FROM assignments t WHERE t.comparison_id = {comparison} AND (t.state = 'voted' OR "
            "(t.state = 'open' AND t.expires > :now AND t.id != :exclude))")  # fmt: skip


_ROOM = f"(i.is_attention = 1 OR ({_taken('c.id')}) < p.k)"
_OFFERABLE = f"""SELECT c.id FROM comparisons c JOIN items i ON i.id = c.item_id JOIN projects p ON p.id = i.project_id
    WHERE p.id = :pid AND {_ROOM}
    AND NOT EXISTS (SELECT 1 FROM assignments u WHERE u.comparison_id = c.id AND u.user_id = :uid)"""
_ASSIGNMENT = """SELECT a.id, a.comparison_id, a.user_id, a.flipped, a.state, a.expires, c.i, c.j, i.prompt,
    i.responses, i.external_id, i.project_id, i.is_attention, p.k, p.rubric, p.name AS project
    FROM assignments a JOIN comparisons c ON c.id = a.comparison_id JOIN items i ON i.id = c.item_id
    JOIN projects p ON p.id = i.project_id"""
_OF_USER = "FROM assignments a JOIN comparisons c ON c.id = a.comparison_id JOIN items i ON i.id = c.item_id " \
           "WHERE i.project_id = ? AND a.user_id = ?"  # fmt: skip


class LabelStore(Accounts):
    """The labelling store at `path`: users and sessions (Accounts), projects, assignments and votes. A missing
    file is created only with `create`; an older file is migrated on open; a newer one is refused
    (lmforge.label.db.SchemaError). A reservation lasts `lease_s` seconds, a login session `session_s`."""

    def __init__(self, path: Path | str, *, create: bool = False, lease_s: float = LEASE_S,
                 session_s: float = SESSION_S) -> None:  # fmt: skip
        super().__init__(path, create=create, session_s=session_s)
        self.lease_s = lease_s

    def create_project(self, name: str, items: Sequence[Candidate], *, k: int = 3,
                       attention: Sequence[Candidate] = (), rubric: tuple[str, ...] = ("helpful", "honest", "harmless"),
                       seed: int = 0) -> Project:  # fmt: skip
        """A project with one comparison per item and pair of its responses (pairs_of), each to be labelled by k
        distinct annotators. Attention checks compare responses 0 and 1 of items with a known meta["label"];
        every annotator gets each of them once, spread evenly among the items."""
        if not NAME.fullmatch(name):
            raise ValueError(f"project name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if k < 1:
            raise ValueError(f"k={k}: each comparison needs at least 1 annotator")
        if not items:
            raise ValueError(f"project {name!r}: no items to label")
        for kind, group in (("item", items), ("attention item", attention)):
            ids = [item.id for item in group]
            if len(set(ids)) != len(ids):
                raise ValueError(f"project {name!r}: {kind} id {next(i for i in ids if ids.count(i) > 1)!r} "
                                 "appears twice; ids must be unique, since votes are joined back on them")  # fmt: skip
        for item in attention:
            if item.label not in LABELS:
                raise ValueError(f"attention item {item.id!r} ({item.source or 'no source'}): meta['label'] is "
                                 f"{item.label!r}; an attention check needs its answer, one of {list(LABELS)}")
        with self._connect() as c, db.write(c):
            if c.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"project {name!r} already exists in {self.path}")
            project_id = c.execute("INSERT INTO projects (name, k, seed, rubric, created) VALUES (?, ?, ?, ?, ?)",
                                   (name, k, seed, json.dumps(list(rubric)), now_iso())).lastrowid  # fmt: skip
            stored = [(self._insert_item(c, project_id, item, False), item) for item in items]
            regular = [(item_id, pair) for item_id, item in stored for pair in pairs_of(item)]
            checks = [(self._insert_item(c, project_id, item, True), (0, 1)) for item in attention]
            checks_left = iter(checks)
            for ord_, index in enumerate(serving_order(len(regular), len(checks))):
                item_id, (i, j) = next(checks_left) if index is None else regular[index]
                c.execute("INSERT INTO comparisons (item_id, i, j, ord) VALUES (?, ?, ?, ?)", (item_id, i, j, ord_))
        return self.project(name)

    @staticmethod
    def _insert_item(c: sqlite3.Connection, project_id: int, item: Candidate, is_attention: bool) -> int:
        prompt = [{"role": m.role, "content": m.content} for m in item.prompt]
        responses = [{"model": r.model, "content": r.content} for r in item.responses]
        return c.execute("INSERT INTO items (project_id, external_id, prompt, responses, reference, is_attention, "
                         "label) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (project_id, item.id, json.dumps(prompt, ensure_ascii=False),
                          json.dumps(responses, ensure_ascii=False), item.reference, int(is_attention),
                          item.label if is_attention else None)).lastrowid  # fmt: skip

    def projects(self) -> list[Project]:
        with self._connect() as c:
            names = [r["name"] for r in c.execute("SELECT name FROM projects ORDER BY id")]
            return [self._project(c, n) for n in names]

    def project(self, name: str) -> Project:
        with self._connect() as c:
            return self._project(c, name)

    def _project(self, c: sqlite3.Connection, name: str) -> Project:
        row = c.execute("SELECT * FROM projects WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(f"no project {name!r} in {self.path}; create one with `lmforge label project create`")
        counts = c.execute("SELECT COUNT(DISTINCT CASE WHEN i.is_attention = 0 THEN i.id END), "
                           "SUM(i.is_attention = 0), SUM(i.is_attention = 1) FROM comparisons c JOIN items i "
                           "ON i.id = c.item_id WHERE i.project_id = ?", (row["id"],)).fetchone()  # fmt: skip
        return Project(row["id"], row["name"], row["k"], row["seed"], tuple(json.loads(row["rubric"])),
                       counts[0] or 0, counts[1] or 0, counts[2] or 0, row["created"])  # fmt: skip

    def _project_id(self, c: sqlite3.Connection, name: str) -> int:
        row = c.execute("SELECT id FROM projects WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(f"no project {name!r} in {self.path}; create one with `lmforge label project create`")
        return int(row["id"])

    # labelling

    def next_assignment(self, project: str, user: User) -> Assignment | None:
        """The comparison `user` should label next, or None when none is left for them. An open assignment of
        theirs comes back first (the latest opened: an undone vote before the page they had open), its lease
        renewed; else the first comparison, in serving order, that they never saw and that has room is reserved
        for them, in the same transaction that checked the room."""
        now = time.time()
        with self._connect() as c, db.write(c):
            project_id = self._project_id(c, project)
            own = c.execute(f"{_ASSIGNMENT} WHERE i.project_id = ? AND a.user_id = ? AND a.state = 'open' "
                            "ORDER BY a.opened DESC, a.id DESC", (project_id, user.id)).fetchall()  # fmt: skip
            for row in own:
                if row["expires"] > now or self._has_room(c, row, now):
                    c.execute("UPDATE assignments SET expires = ? WHERE id = ?", (now + self.lease_s, row["id"]))
                    return self._assignment(c, row, now)
                # the lease ran out and others filled the comparison: this annotator's slot is gone for good
                c.execute("UPDATE assignments SET state = 'expired' WHERE id = ?", (row["id"],))
            free = c.execute(f"{_OFFERABLE} ORDER BY c.ord LIMIT 1",
                             {"pid": project_id, "uid": user.id, "now": now, "exclude": 0}).fetchone()  # fmt: skip
            if free is None:
                return None
            seed = c.execute("SELECT seed FROM projects WHERE id = ?", (project_id,)).fetchone()[0]
            assignment_id = c.execute(
                "INSERT INTO assignments (comparison_id, user_id, flipped, created, opened, expires, state) "
                "VALUES (?, ?, ?, ?, ?, ?, 'open')",
                (free["id"], user.id, int(is_flipped(seed, free["id"], user.id)), now_iso(), now, now + self.lease_s),
            ).lastrowid  # fmt: skip
            return self._assignment(c, c.execute(f"{_ASSIGNMENT} WHERE a.id = ?", (assignment_id,)).fetchone(), now)

    @staticmethod
    def _has_room(c: sqlite3.Connection, row: sqlite3.Row, now: float) -> bool:
        """Whether the comparison of assignment `row` has room for it, not counting the assignment itself."""
        if row["is_attention"]:
            return True
        taken = c.execute(_taken(":cid"),
                          {"cid": row["comparison_id"], "now": now, "exclude": row["id"]}).fetchone()[0]  # fmt: skip
        return taken < row["k"]

    def _assignment(self, c: sqlite3.Connection, row: sqlite3.Row, now: float) -> Assignment:
        responses = json.loads(row["responses"])
        a, b = responses[row["i"]]["content"], responses[row["j"]]["content"]
        progress = self._progress(c, row["project_id"], row["user_id"], now)
        left, right = (b, a) if row["flipped"] else (a, b)
        return Assignment(row["id"], row["comparison_id"], conversation(row["prompt"]), left, right,
                          bool(row["flipped"]), progress.done + 1, progress.total, row["external_id"],
                          row["project"])  # fmt: skip

    def _progress(self, c: sqlite3.Connection, project_id: int, user_id: int, now: float) -> Progress:
        done = c.execute(f"SELECT COUNT(*) {_OF_USER} AND a.state = 'voted'", (project_id, user_id)).fetchone()[0]
        held = c.execute(f"SELECT COUNT(*) {_OF_USER} AND a.state = 'open'", (project_id, user_id)).fetchone()[0]
        available = c.execute(f"SELECT COUNT(*) FROM ({_OFFERABLE})",
                              {"pid": project_id, "uid": user_id, "now": now, "exclude": 0}).fetchone()[0]  # fmt: skip
        return Progress(done, done + held + available)

    def progress(self, project: str, user: User) -> Progress:
        """How many comparisons `user` has voted on in `project`, of how many they have done or can still get."""
        with self._connect() as c:
            return self._progress(c, self._project_id(c, project), user.id, time.time())

    def _own_open(self, c: sqlite3.Connection, assignment_id: int, user: User) -> sqlite3.Row:
        row = c.execute(f"{_ASSIGNMENT} WHERE a.id = ?", (assignment_id,)).fetchone()
        if row is None:
            raise KeyError(f"no assignment {assignment_id} in {self.path}")
        if row["user_id"] != user.id:
            raise PermissionError(f"assignment {assignment_id} belongs to another annotator, not {user.name!r}")
        if row["state"] != "open":
            raise ValueError(f"assignment {assignment_id} is {row['state']}, not open: "
                             f"{'it has its vote already' if row['state'] == 'voted' else 'ask for the next one'}")
        return row

    def vote(self, assignment_id: int, user: User, choice: str, *, note: str = "", rubric: dict | None = None,
             seconds: float | None = None) -> VoteResult:  # fmt: skip
        """Record `user`'s vote on their assignment: `choice` (and each rubric dimension's value) is "left",
        "right", "tie" or "both_bad" as shown, stored as a / b in the item's order. Committed on return; the result
        reveals the two sides' models. ValueError for a bad choice, an assignment already voted on or skipped, or
        one whose lease ran out after others filled the comparison; KeyError for an unknown assignment;
        PermissionError for another annotator's."""
        if choice not in CHOICES:
            raise ValueError(f"choice {choice!r}: expected one of {list(CHOICES)}")
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds={seconds!r}: expected a finite number >= 0, or None")
        now = time.time()
        with self._connect() as c, db.write(c):
            row = self._own_open(c, assignment_id, user)
            if row["expires"] <= now and not self._has_room(c, row, now):
                raise ValueError(f"assignment {assignment_id}: its lease ran out and {row['k']} other annotators "
                                 "took the comparison meanwhile; the vote was not recorded, ask for the next one")
            flipped = bool(row["flipped"])
            dims = self._rubric(rubric or {}, json.loads(row["rubric"]), flipped)
            vote_id = c.execute("INSERT INTO votes (assignment_id, comparison_id, user_id, choice, note, rubric, "
                                "seconds, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (assignment_id, row["comparison_id"], user.id, _unflip(choice, flipped), note,
                                 json.dumps(dims), seconds, now_iso())).lastrowid  # fmt: skip
            c.execute("UPDATE assignments SET state = 'voted' WHERE id = ?", (assignment_id,))
        models = [r["model"] for r in json.loads(row["responses"])]
        left, right = models[row["i"]], models[row["j"]]
        shown = (right, left) if flipped else (left, right)
        return VoteResult(assignment_id, vote_id, _unflip(choice, flipped), *shown)

    @staticmethod
    def _rubric(rubric: dict, dimensions: list[str], flipped: bool) -> dict[str, str]:
        """The rubric answers as a / b; a dimension left blank is not stored."""
        unknown = sorted(set(rubric) - set(dimensions))
        if unknown:
            raise ValueError(f"rubric dimensions {unknown} are not this project's {dimensions}")
        out = {}
        for dim, value in rubric.items():
            if value in ("", None):
                continue
            if value not in RUBRIC_CHOICES:
                raise ValueError(f"rubric {dim!r} = {value!r}: expected one of {list(RUBRIC_CHOICES)} or blank")
            out[dim] = _unflip(value, flipped)
        return out

    def skip(self, assignment_id: int, user: User) -> None:
        """`user` passes on their assignment: its slot is freed and it is never offered to them again."""
        with self._connect() as c, db.write(c):
            self._own_open(c, assignment_id, user)
            c.execute("UPDATE assignments SET state = 'skipped' WHERE id = ?", (assignment_id,))

    def undo_last(self, project: str, user: User) -> Assignment | None:
        """Delete `user`'s latest vote in `project` and reopen its assignment, which next_assignment returns first
        (the vote's slot becomes the reservation's, so the comparison never exceeds k). None if no vote is left."""
        now = time.time()
        with self._connect() as c, db.write(c):
            project_id = self._project_id(c, project)
            last = c.execute("SELECT v.id, v.assignment_id FROM votes v JOIN comparisons c ON c.id = v.comparison_id "
                             "JOIN items i ON i.id = c.item_id WHERE i.project_id = ? AND v.user_id = ? "
                             "ORDER BY v.id DESC LIMIT 1", (project_id, user.id)).fetchone()  # fmt: skip
            if last is None:
                return None
            c.execute("DELETE FROM votes WHERE id = ?", (last["id"],))
            c.execute("UPDATE assignments SET state = 'open', opened = ?, expires = ? WHERE id = ?",
                      (now, now + self.lease_s, last["assignment_id"]))  # fmt: skip
            reopened = c.execute(f"{_ASSIGNMENT} WHERE a.id = ?", (last["assignment_id"],)).fetchone()
            return self._assignment(c, reopened, now)

    # reading the labels back

    def comparisons(self, project: str) -> list[ComparisonRow]:
        """Every comparison of `project`, in serving order, with its prompt, responses a / b and models."""
        with self._connect() as c:
            rows = c.execute("SELECT c.id, c.i, c.j, i.external_id, i.prompt, i.responses, i.is_attention, i.label "
                             "FROM comparisons c JOIN items i ON i.id = c.item_id WHERE i.project_id = ? "
                             "ORDER BY c.ord", (self._project_id(c, project),)).fetchall()  # fmt: skip
        out = []
        for r in rows:
            responses = json.loads(r["responses"])
            a, b = responses[r["i"]], responses[r["j"]]
            out.append(ComparisonRow(r["id"], r["external_id"], conversation(r["prompt"]), a["model"], b["model"],
                                     a["content"], b["content"], bool(r["is_attention"]), r["label"]))  # fmt: skip
        return out

    def votes(self, project: str) -> list[VoteRow]:
        """Every human vote in `project`, oldest first, with its item, models and choice (a / b in item order)."""
        with self._connect() as c:
            rows = c.execute("SELECT v.*, u.name AS annotator, c.i, c.j, i.responses, i.external_id, i.is_attention, "
                             "i.label FROM votes v JOIN users u ON u.id = v.user_id JOIN comparisons c ON "
                             "c.id = v.comparison_id JOIN items i ON i.id = c.item_id WHERE i.project_id = ? "
                             "ORDER BY v.id", (self._project_id(c, project),)).fetchall()  # fmt: skip
        out = []
        for r in rows:
            models = [x["model"] for x in json.loads(r["responses"])]
            out.append(VoteRow(r["id"], r["comparison_id"], r["external_id"], r["annotator"], models[r["i"]],
                               models[r["j"]], r["choice"], r["note"], json.loads(r["rubric"]), r["seconds"],
                               r["created"], bool(r["is_attention"]), r["label"]))  # fmt: skip
        return out

    def judge_votes(self, project: str) -> list[JudgeVoteRow]:
        with self._connect() as c:
            rows = c.execute("SELECT j.* FROM judge_votes j JOIN comparisons c ON c.id = j.comparison_id JOIN items i "
                             "ON i.id = c.item_id WHERE i.project_id = ? ORDER BY j.judge, j.comparison_id",
                             (self._project_id(c, project),)).fetchall()  # fmt: skip
        return [JudgeVoteRow(r["comparison_id"], r["judge"], r["choice"], json.loads(r["detail"])) for r in rows]

    def add_judge_votes(self, project: str, judge: str, records: Sequence[dict[str, Any]],
                        skipped: Skipped | None = None) -> int:  # fmt: skip
        """Store an AI judge's `lmforge`-format records (provenance item_id and models) as its votes on the
        matching comparisons of `project`, replacing its earlier vote on each. Returns how many were stored; a
        record matching no comparison is skipped and counted in `skipped` (and logged)."""
        if not judge:
            raise ValueError("judge: a non-empty name is needed to tell judges apart on the results page")
        skipped = skipped if skipped is not None else Skipped()
        by_key = {(r.item_id, frozenset((r.model_a, r.model_b))): r for r in self.comparisons(project)
                  if not r.is_attention and r.model_a != r.model_b}  # fmt: skip
        rows = []
        for n, record in enumerate(records, 1):
            try:
                rows.append(_judge_row(record, by_key))
            except ValueError as e:
                skipped.add(f"{judge} record {n}", str(e))
        with self._connect() as c, db.write(c):
            c.executemany("INSERT INTO judge_votes (comparison_id, judge, choice, detail) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT (comparison_id, judge) DO UPDATE SET choice = excluded.choice, "
                          "detail = excluded.detail", [(cid, judge, choice, detail) for cid, choice, detail in rows])
        if skipped.count:
            log.warning("judge %s: %d record(s) skipped: %s", judge, skipped.count, "; ".join(skipped.examples))
        return len(rows)


def _unflip(side: str, flipped: bool) -> str:
    """What the annotator clicked ("left" / "right", or tie / both bad) as a / b in the item's response order."""
    if side not in ("left", "right"):
        return side
    return "b" if (side == "left") == flipped else "a"


def _judge_row(record: dict[str, Any], by_key: dict[tuple[str, frozenset], ComparisonRow]) -> tuple[int, str, str]:
    """(comparison id, choice a / b / tie / both_bad, provenance JSON) of one judge record; ValueError naming
    what does not match."""
    prov = record.get("provenance") if isinstance(record, dict) else None
    models = prov.get("models") if isinstance(prov, dict) else None
    if not isinstance(models, dict) or "item_id" not in prov:
        raise ValueError("no provenance: an lmforge record needs provenance.item_id and provenance.models")
    chosen, rejected = models.get("chosen"), models.get("rejected")
    row = by_key.get((str(prov["item_id"]), frozenset((chosen, rejected))))
    if row is None:
        raise ValueError(f"no comparison: item {prov['item_id']!r} with models {chosen!r} and {rejected!r} is not "
                         "in the project")  # fmt: skip
    choice = "both_bad" if record.get("both_bad") else "tie" if record.get("tie") else \
        "a" if chosen == row.model_a else "b"  # fmt: skip
    return row.id, choice, json.dumps(prov, ensure_ascii=False)
