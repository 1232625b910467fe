"""Helpers for the live labelling-app tests (test_live_server.py, test_browser.py): a database with users and a
project made through LabelStore, `lmforge label serve DB` run in a subprocess on a free loopback port, and an
annotator's HTTP session that logs in with a token and posts the labelling page's forms as a browser would."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import httpx

HOST = "127.0.0.1"
PROJECT = "demo"
MODELS = ("sft", "dpo", "grpo")
ACKNOWLEDGED = (200, 303)  # a vote the server answered with one of these is promised to be stored


@dataclass
class LiveDb:
    path: Path
    project: str
    tokens: dict[str, str]  # user name -> login token (the first user is the admin)
    n_comparisons: int
    k: int


def synthetic_items(n_items: int, models: tuple[str, ...] = MODELS) -> list[dict]:
    """`n_items` candidates records (the candidates file's JSON), each prompt answered by every model."""
    return [{"id": f"q{n}", "prompt": [{"role": "user", "content": f"Question {n}: what is {n} + {n}?"}],
             "responses": [{"model": m, "content": f"Reply {j} to question {n}."} for j, m in enumerate(models)]}
            for n in range(n_items)]  # never a model's name in a reply: the page must stay blind  # fmt: skip


def make_db(directory: Path, records: list[dict], *, annotators: int, k: int = 3, project: str = PROJECT) -> LiveDb:
    """A store at directory/label.db with one admin ("admin"), `annotators` annotators ("ann00", ...) and one
    project of the candidates `records` (written to directory/items.jsonl and read back), k votes wanted per
    comparison."""
    from lmforge.label.candidates import pairs_of, read_candidates
    from lmforge.label.store import LabelStore

    path = directory / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    items, skipped = read_candidates(path)
    assert len(items) == len(records), skipped
    store = LabelStore(directory / "label.db", create=True)
    tokens = {"admin": store.add_user("admin", role="admin")}
    tokens |= {f"ann{i:02d}": store.add_user(f"ann{i:02d}") for i in range(annotators)}
    store.create_project(project, items, k=k)
    return LiveDb(directory / "label.db", project, tokens, sum(len(pairs_of(it)) for it in items), k)


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick; another process could take it before we bind)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses with a socket listening on `port`, from /proc/net/tcp (Linux)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


class Server:
    """`lmforge label serve DB --port P` in a subprocess (default host, which must be loopback); its output goes
    to `log`, whose tail any startup error quotes."""

    def __init__(self, db: Path, log: Path, port: int | None = None) -> None:
        self.db, self.log, self.port = db, log, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "lmforge.cli", "label", "serve", str(self.db), "--port", str(self.port)]

    def start(self, timeout: float = 30.0) -> Server:
        """Start the server and wait until GET /health answers {"status": "ok"}."""
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before answering /health:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            try:
                r = httpx.get(f"{self.url}/health", timeout=1.0)
                if r.status_code == 200 and r.json() == {"status": "ok"}:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"the server did not answer {self.url}/health within {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to finish anything."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Fields(HTMLParser):
    """The fields a browser would post with the labelling page's vote form (its inputs other than radio buttons)
    and the session's csrf token (every form carries it)."""

    def __init__(self) -> None:
        super().__init__()
        self.vote_form: dict[str, str] = {}
        self.csrf = ""
        self._form: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self._form = a.get("id")
        elif tag == "input" and a.get("name") and a.get("type") != "radio":
            if a["name"] == "csrf":
                self.csrf = a.get("value") or ""
            if self._form == "vote-form":
                self.vote_form[a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None


@dataclass
class Page:
    """A labelling page: its vote form's fields (empty when the annotator has nothing left) and the csrf token."""

    form: dict[str, str]
    csrf: str
    html: str

    @property
    def assignment(self) -> str | None:
        return self.form.get("assignment")


class Annotator:
    """One person's session: its own cookies, no redirects followed (a vote's 303 is its acknowledgement)."""

    def __init__(self, url: str, token: str, timeout: float = 20.0) -> None:
        self.token = token
        self.http = httpx.Client(base_url=url, follow_redirects=False, timeout=timeout)

    def login(self) -> None:
        r = self.http.post("/login", data={"token": self.token})
        if r.status_code != 303 or "lmforge_session" not in self.http.cookies:
            raise AssertionError(f"login answered {r.status_code} {r.headers.get('location')}: {r.text[:300]}")

    def page(self, project: str) -> Page:
        r = self.http.get(f"/p/{project}")
        if r.status_code != 200:
            raise AssertionError(f"GET /p/{project} answered {r.status_code}: {r.text[:300]}")
        fields = _Fields()
        fields.feed(r.text)
        return Page(fields.vote_form, fields.csrf, r.text)

    def vote(self, project: str, page: Page, choice: str, **form: str) -> httpx.Response:
        """Post the vote form: `choice` is left|right|tie|both_bad, `form` any other fields (note, rubric_*)."""
        data = page.form | {"choice": choice, "seconds": "1.5"} | form
        return self.http.post(f"/p/{project}/vote", data=data)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def close(self) -> None:
        self.http.close()
