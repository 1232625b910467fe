"""Who is asking, and may they: the login rate limit, the session cookie, the CSRF check and the roles of the
labelling app (app.py). The store keeps users, hashed tokens and sessions; this module only reads requests.

A login sets the `lmforge_session` cookie to a random session token (the store keeps its hash and expiry), HttpOnly
so page scripts cannot read it and SameSite=Strict so no other site's page sends it. Every POST but the login also
carries the session's CSRF token (form field `csrf` or header `X-CSRF-Token`): SameSite already stops cross-site
posts in current browsers, and the token stops them in the others."""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import deque
from typing import Callable

from fastapi import HTTPException, Request

SESSION_COOKIE = "lmforge_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
_PRUNE_AT = 1024  # failing addresses kept before stale ones are swept


class LoginRequired(Exception):
    """Raised by a page that needs a login; the app answers with a 303 to /login."""


class LoginLimiter:
    """At most `limit` failed logins per client address in any `window_s` seconds. Only failures count, so a user
    who types the token right is never slowed; while a client is over the limit, every attempt is refused, the
    right token included, or guessing would go on through the refusals."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"login limit must be >= 1 and its window > 0 s, got {limit} in {window_s} s")
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # the app's sync routes run on a thread pool

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(client, None)  # forget quiet clients, so the table stays small
        return times

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until `client` may try again, or None when it may try now."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if len(times) < self.limit:
                return None
            return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            if len(self._failures) >= _PRUNE_AT:  # many addresses that failed once and left: drop the stale ones
                for other in list(self._failures):
                    self._recent(other, now)
            self._recent(client, now)
            self._failures.setdefault(client, deque()).append(now)


def client_address(request: Request) -> str:
    """The peer's address: the key of the login limit. Behind a reverse proxy every client shares the proxy's."""
    return request.client.host if request.client else "unknown"


def session_token(request: Request) -> str | None:
    return request.cookies.get(SESSION_COOKIE) or None


def check_csrf(request: Request, expected: str, form_value: str | None) -> None:
    """403 unless the form field or the header carries the session's CSRF token (compared in constant time)."""
    given = form_value or request.headers.get(CSRF_HEADER) or ""
    if not given or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def require_admin(role: str) -> None:
    if role != "admin":
        raise HTTPException(403, "this page is for admins only")
