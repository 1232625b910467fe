"""The labelling store's SQLite file: connections, transactions and the versioned schema (docs/labelling.md,
"Storage").

Every connection runs in WAL mode (readers never block the one writer, and a commit is one append to the log) with
`synchronous=FULL` (the log is fsynced at every commit, so a vote acknowledged to a browser survives a power cut or
a SIGKILL of the server), a 10 s busy timeout (writers queue rather than fail) and foreign keys on.

The schema is a list of SQL scripts, MIGRATIONS[v] taking a file from version v to v + 1, with the version in
`PRAGMA user_version`. Opening an older file applies the missing scripts in one transaction; a file from a newer
lmforge is refused, since this code cannot know what its tables mean.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 10.0

MIGRATIONS: list[str] = [
    # 1: people, projects, the comparisons and the votes on them
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'annotator')),
        token_sha256 TEXT NOT NULL UNIQUE,
        disabled INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL
    );
    CREATE TABLE sessions (
        token_sha256 TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        csrf TEXT NOT NULL,
        expires REAL NOT NULL
    );
    CREATE TABLE projects (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        k INTEGER NOT NULL CHECK (k >= 1),
        seed INTEGER NOT NULL,
        rubric TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE TABLE items (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
        external_id TEXT NOT NULL,
        prompt TEXT NOT NULL,
        responses TEXT NOT NULL,
        reference TEXT,
        is_attention INTEGER NOT NULL DEFAULT 0,
        label TEXT,
        UNIQUE (project_id, is_attention, external_id)
    );
    CREATE TABLE comparisons (
        id INTEGER PRIMARY KEY,
        item_id INTEGER NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        i INTEGER NOT NULL,
        j INTEGER NOT NULL,
        ord INTEGER NOT NULL,
        CHECK (i < j)
    );
    CREATE TABLE assignments (
        id INTEGER PRIMARY KEY,
        comparison_id INTEGER NOT NULL REFERENCES comparisons (id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users (id),
        flipped INTEGER NOT NULL,
        created TEXT NOT NULL,
        opened REAL NOT NULL,
        expires REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'voted', 'skipped', 'expired')),
        UNIQUE (comparison_id, user_id)
    );
    CREATE TABLE votes (
        id INTEGER PRIMARY KEY,
        assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments (id) ON DELETE CASCADE,
        comparison_id INTEGER NOT NULL REFERENCES comparisons (id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users (id),
        choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
        note TEXT NOT NULL DEFAULT '',
        rubric TEXT NOT NULL DEFAULT '{}',
        seconds REAL,
        created TEXT NOT NULL
    );
    CREATE INDEX comparisons_by_item ON comparisons (item_id);
    CREATE INDEX votes_by_comparison ON votes (comparison_id);
    """,
    # 2: AI judges' votes beside the people's, and the indexes the assignment query walks
    """
    CREATE TABLE judge_votes (
        id INTEGER PRIMARY KEY,
        comparison_id INTEGER NOT NULL REFERENCES comparisons (id) ON DELETE CASCADE,
        judge TEXT NOT NULL,
        choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
        detail TEXT NOT NULL DEFAULT '{}',
        UNIQUE (comparison_id, judge)
    );
    CREATE INDEX assignments_by_user ON assignments (user_id, state);
    CREATE INDEX assignments_by_comparison ON assignments (comparison_id, state, expires);
    CREATE INDEX votes_by_user ON votes (user_id, id);
    """,
]
VERSION = len(MIGRATIONS)


class SchemaError(RuntimeError):
    """The file's schema version is one this lmforge cannot use."""


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection to the store at `path` with the store's settings. Autocommit mode: transactions are opened
    explicitly by `write`, so no statement ever runs in a transaction Python opened behind our back."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One BEGIN IMMEDIATE transaction: the write lock is taken before the first read, so a check ("fewer than k
    votes") and the write it allows cannot interleave with another writer's; committed when the block ends,
    rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: Path | str, target: int | None = None) -> int:
    """Bring the file to schema version `target` (default: the current one) and return the version it had.
    Refuses a file newer than this code. The scripts run inside one transaction with the version bump, so a crash
    mid-migration leaves the old version intact."""
    target = VERSION if target is None else target
    with write(conn):
        found = user_version(conn)
        if found > VERSION:
            raise SchemaError(f"{path}: the labelling store has schema version {found}, newer than this lmforge's "
                              f"{VERSION}; open it with the lmforge that wrote it, or upgrade lmforge")  # fmt: skip
        for version in range(found, target):
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
        if target > found:
            conn.execute(f"PRAGMA user_version = {target}")
    return found


def _statements(script: str) -> list[str]:
    # executescript would COMMIT the open transaction first; one execute per statement keeps the migration atomic
    # (so a migration script must not hold ';' inside a literal)
    return [s.strip() for s in script.split(";") if s.strip()]


def open_store(path: Path | str, create: bool = False) -> sqlite3.Connection:
    """Connect to the store at `path`, migrating an older file. A missing file is created only with `create`."""
    path = Path(path)
    if not create and not path.is_file():
        raise FileNotFoundError(f"{path}: no labelling store there; create one with `lmforge label init {path}`")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn
