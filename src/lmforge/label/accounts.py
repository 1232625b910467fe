"""Users, their login tokens and their sessions in the labelling store (docs/labelling.md, "Storage").

Tokens (login tokens and session cookies) are `secrets.token_urlsafe(32)`: 256 random bits, shown once. Only their
SHA-256 is stored and looked up, so a copy of the database file logs nobody in. Every method opens its own
connection and closes it before returning, so one instance may be shared by threads; every write is one
BEGIN IMMEDIATE transaction (lmforge.label.db.write) committed before the method returns.
"""

from __future__ import annotations

import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.label import db
from lmforge.label.records import Session, User, now_iso, sha256

ROLES = ("admin", "annotator")
SESSION_S = 12 * 3600.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Accounts:
    """The users and login sessions of the labelling store at `path` (lmforge.label.store.LabelStore adds the
    projects and the labelling). A missing file is created only with `create`; an older file is migrated on open; a
    newer one is refused (lmforge.label.db.SchemaError)."""

    def __init__(self, path: Path | str, *, create: bool = False, session_s: float = SESSION_S) -> None:
        self.path = Path(path)
        self.session_s = session_s
        db.open_store(self.path, create).close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = db.connect(self.path)
        try:
            yield conn
        finally:
            conn.close()

    def add_user(self, name: str, role: str = "annotator") -> str:
        """Create a user and return their login token (shown once: only its hash is kept)."""
        if not NAME.fullmatch(name):
            raise ValueError(f"user name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit")  # fmt: skip
        if role not in ROLES:
            raise ValueError(f"role {role!r}: expected one of {list(ROLES)}")
        token = secrets.token_urlsafe(32)
        with self._connect() as c, db.write(c):
            if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"user {name!r} already exists in {self.path}; give them a new token with "
                                 "LabelStore.rotate_token instead")  # fmt: skip
            c.execute("INSERT INTO users (name, role, token_sha256, created) VALUES (?, ?, ?, ?)",
                      (name, role, sha256(token), now_iso()))  # fmt: skip
        return token

    def rotate_token(self, name: str) -> str:
        """A new token for `name`; the old one and every session made with it stop working."""
        token = secrets.token_urlsafe(32)
        with self._connect() as c, db.write(c):
            user_id = self._user_id(c, name)
            c.execute("UPDATE users SET token_sha256 = ? WHERE id = ?", (sha256(token), user_id))
            c.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
        return token

    def disable_user(self, name: str) -> None:
        """`name` can no longer log in, and their sessions end; their votes stay."""
        with self._connect() as c, db.write(c):
            user_id = self._user_id(c, name)
            c.execute("UPDATE users SET disabled = 1 WHERE id = ?", (user_id,))
            c.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))

    def _user_id(self, c: sqlite3.Connection, name: str) -> int:
        row = c.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(f"no user {name!r} in {self.path}; add one with `lmforge label user add`")
        return int(row["id"])

    def user_by_token(self, token: str) -> User | None:
        """The enabled user whose token this is, or None."""
        digest = sha256(token)
        with self._connect() as c:
            row = c.execute("SELECT * FROM users WHERE token_sha256 = ? AND disabled = 0", (digest,)).fetchone()
        # the lookup matched on the hash already; the constant-time compare keeps the check itself timing-free
        if row is None or not hmac.compare_digest(row["token_sha256"], digest):
            return None
        return User(row["id"], row["name"], row["role"])

    def users(self) -> list[User]:
        with self._connect() as c:
            rows = c.execute("SELECT * FROM users ORDER BY id").fetchall()
        return [User(r["id"], r["name"], r["role"], bool(r["disabled"])) for r in rows]

    def create_session(self, user: User) -> tuple[str, str]:
        """A login session for `user`: (session token for the cookie, CSRF token for the forms)."""
        token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        with self._connect() as c, db.write(c):
            c.execute("DELETE FROM sessions WHERE expires <= ?", (now,))  # expired ones are never read again
            c.execute("INSERT INTO sessions (token_sha256, user_id, csrf, expires) VALUES (?, ?, ?, ?)",
                      (sha256(token), user.id, csrf, now + self.session_s))  # fmt: skip
        return token, csrf

    def session(self, token: str) -> Session | None:
        """The live session of an enabled user with this token, or None."""
        with self._connect() as c:
            row = c.execute("SELECT s.csrf, s.expires, u.id, u.name, u.role FROM sessions s JOIN users u ON "
                            "u.id = s.user_id WHERE s.token_sha256 = ? AND s.expires > ? AND u.disabled = 0",
                            (sha256(token), time.time())).fetchone()  # fmt: skip
        return None if row is None else Session(User(row["id"], row["name"], row["role"]), row["csrf"], row["expires"])

    def end_session(self, token: str) -> None:
        with self._connect() as c, db.write(c):
            c.execute("DELETE FROM sessions WHERE token_sha256 = ?", (sha256(token),))
