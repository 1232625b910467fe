"""Helpers for the labelling app's in-process tests (test_app.py, test_auth.py, test_escaping.py,
test_label_cli.py): a real LabelStore with an admin, two annotators and a project, a TestClient, and readers of the
pages' hidden fields and elements."""

from __future__ import annotations

import html
import re
from pathlib import Path

from fastapi.testclient import TestClient

from lmforge.finetune.data import Message
from lmforge.label.app import create_app
from lmforge.label.candidates import Candidate, Response
from lmforge.label.store import LabelStore

PROJECT = "demo"
# Model names that appear nowhere in the prompts or replies, so finding one on a page means it was revealed.
MODELS = ("zebra-model", "otter-model")


def items(n: int = 3, models: tuple[str, ...] = MODELS, reply: str = "reply {i} number {j}") -> list[Candidate]:
    return [Candidate(f"q{i}", [Message("user", f"question {i}")],
                      [Response(m, reply.format(i=i, j=j)) for j, m in enumerate(models)]) for i in range(n)]


def make_db(path: Path, candidates: list[Candidate] | None = None, k: int = 2) -> tuple[LabelStore, dict[str, str]]:
    """A store with users admin (admin), ann1 and ann2 (annotators) and project PROJECT; their tokens by name."""
    store = LabelStore(path, create=True)
    tokens = {"admin": store.add_user("admin", "admin"), "ann1": store.add_user("ann1"), "ann2": store.add_user("ann2")}
    store.create_project(PROJECT, candidates or items(), k=k)
    return store, tokens


def client(db: Path, **options) -> TestClient:
    return TestClient(create_app(db, **options), follow_redirects=False)


def login(c: TestClient, token: str) -> str:
    """Log `c` in with `token`; the session's CSRF token (read from the projects page, as a browser would)."""
    r = c.post("/login", data={"token": token})
    assert r.status_code == 303, r.text
    return hidden(c.get("/").text, "csrf")


def hidden(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no hidden field {name!r} on the page"
    return html.unescape(found.group(1))


def element_text(page: str, element_id: str) -> str:
    """The unescaped text inside the element with this id (no nested element of the same tag)."""
    found = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page, re.S)
    assert found, f"no element #{element_id} on the page"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(2)))


def vote(c: TestClient, csrf: str, choice: str = "left", **fields: str):
    """Vote on the item the labelling page shows; the response (a 303 when accepted)."""
    assignment = hidden(c.get(f"/p/{PROJECT}").text, "assignment")
    return c.post(f"/p/{PROJECT}/vote", data={"assignment": assignment, "choice": choice, "csrf": csrf, **fields})
