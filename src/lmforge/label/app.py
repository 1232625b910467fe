"""The labelling web app (`lmforge label serve`): blind A/B comparison of model replies, server-rendered pages over
the SQLite store (store.py), working with or without JavaScript.

Routes: /health, /login, /logout, / (projects), /p/{project} (label), /p/{project}/vote|skip|undo (POST),
/p/{project}/results and /p/{project}/export.jsonl|csv (admins). Every prompt and reply is rendered as escaped
text (Jinja autoescape, never `|safe`, no markdown); the Content-Security-Policy allows only this site's own
script and style files, so even text that slipped through escaping could not run. A vote is committed by the store
before the 303 that acknowledges it is sent."""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.label.auth import (CSRF_FIELD, SESSION_COOKIE, LoginLimiter, LoginRequired, check_csrf, client_address,
                                require_admin, session_token)
from lmforge.label.pages import results_tables
from lmforge.label.store import LabelStore, Project, Session

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CHOICES = ("left", "right", "tie", "both_bad")
RUBRIC_CHOICES = ("left", "right", "tie")  # per dimension, on the page's sides like the vote's choice
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # pages hold votes and tokens; the back button must not show a stale item
}
_REVEALS_KEPT = 4096


class _Reveals:
    """The models behind the sides of recent votes, (user id, assignment id) -> (A's model, B's model), for the
    page after a vote. Bounded; after a restart the next page simply shows no reveal."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[int, int], tuple[str, str]] = OrderedDict()

    def put(self, key: tuple[int, int], models: tuple[str, str]) -> None:
        self._kept[key] = models
        while len(self._kept) > _REVEALS_KEPT:
            self._kept.popitem(last=False)

    def get(self, key: tuple[int, int]) -> tuple[str, str] | None:
        return self._kept.get(key)


def _templates() -> Environment:
    # autoescape on for every template, whatever its extension: model output is untrusted text
    return Environment(loader=PackageLoader("lmforge.label", "templates"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _download_name(project: str, suffix: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", project) + suffix


def _int_field(form: dict[str, str], key: str) -> int:
    try:
        return int(form.get(key, ""))
    except ValueError:
        raise HTTPException(400, f"form field {key!r} must be a whole number, got {form.get(key)!r}") from None


def _non_negative(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _seconds(form: dict[str, str]) -> float | None:
    """Time on the item: what the page's script measured; without JavaScript, the server's clock since it
    rendered the page (hidden field `shown`)."""
    measured = _non_negative(form.get("seconds"))
    if measured is not None:
        return round(measured, 3)
    shown, now = _non_negative(form.get("shown")), time.time()
    return round(now - shown, 3) if shown is not None and shown <= now else None


@contextmanager
def _refused() -> Iterator[None]:
    """The store's refusals of a vote or skip as HTTP answers: an assignment voted on or skipped already (another
    tab, a double click) is a conflict, another annotator's is forbidden, an unknown one is not found."""
    try:
        yield
    except ValueError as e:
        raise HTTPException(409, str(e)) from None
    except PermissionError as e:
        raise HTTPException(403, str(e)) from None
    except KeyError as e:
        raise HTTPException(404, str(e.args[0])) from None


def create_app(db_path: str | Path, *, secure_cookie: bool = False, login_limit: int = 5,
               login_window_s: float = 60) -> FastAPI:  # fmt: skip
    """The app over the label database `db_path` (made by `lmforge label init`). `secure_cookie`: send the session
    cookie only over HTTPS (set it when a TLS proxy is in front). `login_limit` failed logins per client address
    in `login_window_s` seconds, then 429 until the oldest leaves the window."""
    store = LabelStore(db_path)
    limiter = LoginLimiter(login_limit, login_window_s)
    env = _templates()
    reveals = _Reveals()
    app = FastAPI(title="lmforge label", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def page(name: str, code: int = 200, headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
        context.setdefault("session", None)
        return HTMLResponse(env.get_template(name).render(**context), status_code=code, headers=headers)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def error_page(request: Request, exc: StarletteHTTPException) -> Response:
        return page("error.html", exc.status_code, exc.headers, status=exc.status_code, message=str(exc.detail))

    def current(request: Request) -> Session:
        token = session_token(request)
        session = store.session(token) if token else None
        if session is None:
            raise LoginRequired()
        return session

    async def form_of(request: Request) -> dict[str, str]:
        return {k: v for k, v in (await request.form()).items() if isinstance(v, str)}

    def posted(request: Request, form: dict[str, str] = Depends(form_of), session: Session = Depends(current)) -> Session:
        check_csrf(request, session.csrf, form.get(CSRF_FIELD))
        return session

    def project_named(name: str) -> Project:
        try:
            return store.project(name)
        except KeyError:
            raise HTTPException(404, f"no project named {name!r}") from None

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse)
    def login_form() -> HTMLResponse:
        return page("login.html", error=None)

    @app.post("/login")
    def login(request: Request, token: str = Form("")) -> Response:
        client = client_address(request)
        wait = limiter.retry_after(client)
        if wait is not None:
            raise HTTPException(429, f"too many failed logins: try again in {wait} s", {"Retry-After": str(wait)})
        user = store.user_by_token(token.strip()) if token.strip() else None
        if user is None:
            limiter.failed(client)
            log.warning("failed login from %s", client)
            return page("login.html", 401, error="That token is not valid (or its user is disabled).")
        session_tok, _ = store.create_session(user)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_tok, httponly=True, samesite="strict", secure=secure_cookie,
                            path="/")  # fmt: skip
        return response

    @app.post("/logout")
    def logout(request: Request, session: Session = Depends(posted)) -> Response:
        store.end_session(session_token(request) or "")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=secure_cookie)
        return response

    @app.get("/", response_class=HTMLResponse)
    def projects(session: Session = Depends(current)) -> HTMLResponse:
        rows = [(p, store.progress(p.name, session.user)) for p in store.projects()]
        return page("projects.html", session=session, rows=rows)

    @app.get("/p/{name}", response_class=HTMLResponse)
    def label(name: str, revealed: int | None = None, session: Session = Depends(current)) -> HTMLResponse:
        project = project_named(name)
        reveal = reveals.get((session.user.id, revealed)) if revealed is not None else None
        assignment = store.next_assignment(name, session.user)
        return page("label.html", session=session, project=project, assignment=assignment, reveal=reveal,
                    progress=store.progress(name, session.user), rubric=tuple(project.rubric), shown=time.time())

    @app.post("/p/{name}/vote")
    def vote(name: str, form: dict[str, str] = Depends(form_of), session: Session = Depends(posted)) -> Response:
        project = project_named(name)
        assignment = _int_field(form, "assignment")
        choice = form.get("choice", "")
        if choice not in CHOICES:
            raise HTTPException(400, f"choice must be one of {list(CHOICES)}, got {choice!r}")
        rubric = {dim: form[f"rubric_{dim}"] for dim in project.rubric if form.get(f"rubric_{dim}")}
        bad = {dim: v for dim, v in rubric.items() if v not in RUBRIC_CHOICES}
        if bad:
            raise HTTPException(400, f"rubric answers must be one of {list(RUBRIC_CHOICES)}, got {bad}")
        with _refused():
            result = store.vote(assignment, session.user, choice, note=form.get("note", "").strip(),
                                rubric=rubric or None, seconds=_seconds(form))  # fmt: skip
        reveals.put((session.user.id, assignment), (result.left_model, result.right_model))
        return RedirectResponse(f"/p/{name}?revealed={assignment}", status_code=303)

    @app.post("/p/{name}/skip")
    def skip(name: str, form: dict[str, str] = Depends(form_of), session: Session = Depends(posted)) -> Response:
        project_named(name)
        with _refused():
            store.skip(_int_field(form, "assignment"), session.user)
        return RedirectResponse(f"/p/{name}", status_code=303)

    @app.post("/p/{name}/undo")
    def undo(name: str, session: Session = Depends(posted)) -> Response:
        project_named(name)
        store.undo_last(name, session.user)  # the reopened item is this user's open assignment: shown next
        return RedirectResponse(f"/p/{name}", status_code=303)

    @app.get("/p/{name}/results", response_class=HTMLResponse)
    def results(name: str, session: Session = Depends(current)) -> HTMLResponse:
        require_admin(session.user.role)
        project_named(name)
        from lmforge.label.results import project_results

        tables = results_tables(project_results(store, name))
        return page("results.html", session=session, project=name, tables=tables)

    def export(name: str, session: Session, suffix: str, media_type: str) -> Response:
        require_admin(session.user.role)
        project_named(name)
        from lmforge.label.export import export_csv, export_jsonl

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"export{suffix}"
            (export_jsonl if suffix == ".jsonl" else export_csv)(store, name, path)
            body = path.read_bytes()
        disposition = f'attachment; filename="{_download_name(name, suffix)}"'
        return Response(body, media_type=media_type, headers={"Content-Disposition": disposition})

    @app.get("/p/{name}/export.jsonl")
    def export_jsonl_route(name: str, session: Session = Depends(current)) -> Response:
        return export(name, session, ".jsonl", "application/x-ndjson")

    @app.get("/p/{name}/export.csv")
    def export_csv_route(name: str, session: Session = Depends(current)) -> Response:
        return export(name, session, ".csv", "text/csv; charset=utf-8")

    return app
