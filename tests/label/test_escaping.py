"""Every prompt, reply, model name and note is shown as text: HTML, script, event-handler and markdown-link tricks
in model output appear escaped and inert on every page (Jinja autoescape, no markdown), under a CSP that allows
no inline script."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from webapp import PROJECT, client, element_text, login, make_db, vote

import lmforge.label
from lmforge.finetune.data import Message
from lmforge.label.candidates import Candidate, Response

PAYLOADS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    '"><svg onload=alert(1)>',
]
# What must never reach a page raw: any of these would be live markup (or a live link) in a browser.
RAW = ["<script>alert", "<img src=x", "<svg onload", "javascript:alert(1)\""]


def _tricky(model_names: tuple[str, str] = ("m-<b>one</b>", 'm-"><svg onload=alert(2)>')) -> list[Candidate]:
    return [Candidate(f"x{i}", [Message("system", "be nice " + p), Message("user", f"say {p}")],
                      [Response(model_names[0], f"first {p}\nsecond line"), Response(model_names[1], p)])
            for i, p in enumerate(PAYLOADS)]  # fmt: skip


@pytest.mark.parametrize("index", range(len(PAYLOADS)))
def test_payloads_in_prompts_and_replies_are_shown_escaped(tmp_path, index) -> None:
    store, tokens = make_db(tmp_path / "l.db", _tricky())
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    for _ in range(index):  # the payload of item `index` is on the page after `index` votes
        vote(c, csrf, "tie")
    page = c.get(f"/p/{PROJECT}").text
    payload = PAYLOADS[index]
    escaped = html.escape(payload, quote=True).replace("&#x27;", "&#39;").replace("&quot;", "&#34;")
    assert escaped in page  # shown, as text
    for raw in RAW:
        assert raw not in page
    assert page.count("<script") == 1  # only the page's own external script
    assert all(link.startswith("/") for link in re.findall(r'(?:href|src|action)="([^"]*)"', page))  # no new link
    # and the text reads back exactly: the payload is a reply on one side, with its line breaks kept
    sides = {element_text(page, "left"), element_text(page, "right")}
    assert sides == {payload, f"first {payload}\nsecond line"}
    prompt = re.search(r'<section id="prompt".*?</section>', page, re.S).group(0)
    assert [html.unescape(t) for t in re.findall(r'<pre class="text">(.*?)</pre>', prompt, re.S)] == [
        f"be nice {payload}", f"say {payload}"]


def test_model_names_are_escaped_in_the_reveal_and_results(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db", _tricky())
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    revealed = c.get(vote(c, csrf, "left").headers["location"]).text
    reveal = element_text(revealed, "reveal")
    assert "m-<b>one</b>" in reveal and 'm-"><svg onload=alert(2)>' in reveal  # the names, as text
    assert "<b>one</b>" not in revealed and "<svg onload" not in revealed
    assert "m-&lt;b&gt;one&lt;/b&gt;" in revealed
    admin = client(tmp_path / "l.db")
    login(admin, tokens["admin"])
    results = admin.get(f"/p/{PROJECT}/results").text
    assert "m-&lt;b&gt;one&lt;/b&gt;" in results
    for raw in ("<b>one</b>", "<svg onload"):
        assert raw not in results


def test_error_pages_escape_what_the_url_carried(tmp_path) -> None:
    _, tokens = make_db(tmp_path / "l.db")
    c = client(tmp_path / "l.db")
    login(c, tokens["ann1"])
    r = c.get("/p/<img src=x onerror=alert(1)>")
    assert r.status_code == 404
    assert "<img" not in r.text and "&#39;&lt;img src=x onerror=alert(1)&gt;&#39;" in r.text


def test_a_note_is_stored_verbatim_not_interpreted(tmp_path) -> None:
    store, tokens = make_db(tmp_path / "l.db", _tricky())
    c = client(tmp_path / "l.db")
    csrf = login(c, tokens["ann1"])
    vote(c, csrf, "left", note=PAYLOADS[0])
    assert [v.note for v in store.votes(PROJECT)] == [PAYLOADS[0]]


def test_templates_never_mark_text_safe() -> None:
    templates = Path(lmforge.label.__file__).parent / "templates"
    for path in templates.glob("*.html"):
        text = path.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, path.name
        # no inline style, script or event handler: the CSP would block them, so the page must not need them
        assert "style=" not in text and "<script>" not in text and not re.search(r"\son[a-z]+=", text), path.name
