"""The labelling app's gatekeeping: login with a token, the session cookie's flags, the login rate limit, CSRF on
every POST, logout, roles, and the login redirect of every page (lmforge.label.auth, app.py)."""

from __future__ import annotations

import time

import pytest
from webapp import PROJECT, client, hidden, login, make_db, vote

from lmforge.label.auth import LoginLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_counts_failures_in_a_sliding_window() -> None:
    clock = Clock()
    limiter = LoginLimiter(3, 60, clock)
    for t in (0, 10, 20):
        assert limiter.retry_after("1.2.3.4") is None
        clock.now = 1000 + t
        limiter.failed("1.2.3.4")
    clock.now = 1030
    assert limiter.retry_after("1.2.3.4") == 30  # the failure at t=0 leaves the window at t=60
    assert limiter.retry_after("5.6.7.8") is None  # per client
    clock.now = 1059.5
    assert limiter.retry_after("1.2.3.4") == 1  # rounded up, never 0
    clock.now = 1060
    assert limiter.retry_after("1.2.3.4") is None  # two failures left in the window
    limiter.failed("1.2.3.4")
    assert limiter.retry_after("1.2.3.4") == 10  # now the one at t=10 is the oldest
    with pytest.raises(ValueError, match="login limit"):
        LoginLimiter(0, 60)


def test_limiter_forgets_addresses_whose_failures_are_old() -> None:
    clock = Clock()
    limiter = LoginLimiter(5, 60, clock)
    for i in range(1024):  # one failure each from many addresses
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._failures) == 1024
    clock.now += 61
    limiter.failed("192.168.0.1")  # the next failure sweeps the stale ones
    assert list(limiter._failures) == ["192.168.0.1"]
    assert limiter.retry_after("10.0.0.0") is None


def test_login_sets_a_strict_httponly_session_cookie(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db")
    r = client(tmp_path / "l.db").post("/login", data={"token": tokens["ann1"]})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("lmforge_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie
    secure = client(tmp_path / "l.db", secure_cookie=True).post("/login", data={"token": tokens["ann1"]})
    assert "Secure" in secure.headers["set-cookie"]
    # the cookie is not the login token, and the token is nowhere in the database file
    assert tokens["ann1"] not in cookie
    assert tokens["ann1"].encode() not in (tmp_path / "l.db").read_bytes()


def test_wrong_token_is_refused_without_a_cookie(tmp_path) -> None:
    make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    for token in ("not-a-token", ""):
        r = c.post("/login", data={"token": token})
        assert r.status_code == 401
        assert "set-cookie" not in r.headers
        assert "not valid" in r.text
    assert c.get("/").status_code == 303


def test_login_rate_limit_answers_429_with_retry_after(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db", login_limit=3, login_window_s=0.5)
    for _ in range(3):
        assert c.post("/login", data={"token": "guess"}).status_code == 401
    blocked = c.post("/login", data={"token": tokens["ann1"]})  # even the right token, while over the limit
    assert blocked.status_code == 429
    assert blocked.headers["retry-after"] == "1"
    assert "set-cookie" not in blocked.headers
    time.sleep(0.6)  # the failures leave the window
    assert c.post("/login", data={"token": tokens["ann1"]}).status_code == 303


def test_default_limit_is_five_failures(tmp_path) -> None:
    make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    assert [c.post("/login", data={"token": "x"}).status_code for _ in range(6)] == [401] * 5 + [429]
    assert 55 <= int(c.post("/login", data={"token": "x"}).headers["retry-after"]) <= 60


@pytest.mark.parametrize("path", ["/", f"/p/{PROJECT}", f"/p/{PROJECT}/results", f"/p/{PROJECT}/export.jsonl",
                                  f"/p/{PROJECT}/export.csv", "/p/unknown"])
def test_pages_redirect_to_login(tmp_path, path) -> None:
    make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    r = c.get(path)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    c.cookies.set("lmforge_session", "forged")
    assert c.get(path).headers["location"] == "/login"


def test_posts_need_a_login_too(tmp_path) -> None:
    make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    for path in (f"/p/{PROJECT}/vote", f"/p/{PROJECT}/skip", f"/p/{PROJECT}/undo", "/logout"):
        r = c.post(path, data={"assignment": "1", "choice": "left", "csrf": "x"})
        assert r.status_code == 303 and r.headers["location"] == "/login", path


def test_health_and_login_need_no_login(tmp_path) -> None:
    make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/login").status_code == 200


def test_csrf_missing_or_wrong_is_403_and_records_nothing(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    for token in ("", "wrong", csrf[:-1]):
        r = vote(c, token)
        assert r.status_code == 403 and "CSRF" in r.text
    for path in (f"/p/{PROJECT}/undo", f"/p/{PROJECT}/skip", "/logout"):
        assert c.post(path, data={"assignment": "1"}).status_code == 403
    assert store.votes(PROJECT) == []
    # a script may send the token in the X-CSRF-Token header instead of the form
    assignment = hidden(c.get(f"/p/{PROJECT}").text, "assignment")
    r = c.post(f"/p/{PROJECT}/vote", data={"assignment": assignment, "choice": "tie"},
               headers={"X-CSRF-Token": csrf})  # fmt: skip
    assert r.status_code == 303
    assert [v.choice for v in store.votes(PROJECT)] == ["tie"]


def test_each_session_has_its_own_csrf_token(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    first, second = client(tmp_path / "l.db"), client(tmp_path / "l.db")
    csrf_first, csrf_second = login(first, tokens["ann1"]), login(second, tokens["ann1"])
    assert csrf_first != csrf_second
    assert vote(first, csrf_second).status_code == 403


def test_logout_ends_the_session(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    cookie = c.cookies["lmforge_session"]
    r = c.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert store.session(cookie) is None
    c.cookies.set("lmforge_session", cookie)  # a copy of the old cookie no longer works
    assert c.get("/").headers["location"] == "/login"


def test_rotated_or_disabled_users_lose_their_sessions(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    login(c, tokens["ann1"])
    store.disable_user("ann1")
    assert c.get("/").headers["location"] == "/login"
    assert c.post("/login", data={"token": tokens["ann1"]}).status_code == 401
    login(c, tokens["ann2"])
    new = store.rotate_token("ann2")
    assert c.get("/").headers["location"] == "/login"
    assert c.post("/login", data={"token": tokens["ann2"]}).status_code == 401
    assert c.post("/login", data={"token": new}).status_code == 303


def test_annotators_cannot_see_results_or_exports(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db")
    annotator, admin = client(tmp_path / "l.db"), client(tmp_path / "l.db")
    login(annotator, tokens["ann1"])
    login(admin, tokens["admin"])
    for path in (f"/p/{PROJECT}/results", f"/p/{PROJECT}/export.jsonl", f"/p/{PROJECT}/export.csv"):
        assert annotator.get(path).status_code == 403, path
        assert admin.get(path).status_code == 200, path
    assert "results" not in annotator.get("/").text
    assert f'href="/p/{PROJECT}/results"' in admin.get("/").text


def test_security_headers_on_every_response(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    responses = [c.get("/login"), c.get("/health"), c.get("/static/label.js"), c.get("/"),
                 c.post("/login", data={"token": "x"})]  # fmt: skip
    login(c, tokens["ann1"])
    responses += [c.get(f"/p/{PROJECT}"), c.get("/p/unknown"), c.get(f"/p/{PROJECT}/results")]
    for r in responses:
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
