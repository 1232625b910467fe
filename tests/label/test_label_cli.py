"""`lmforge label ...`: init, users and their tokens, projects from a PandaLM-shaped file, export, results,
judge import, and `serve` (loopback by default, a warning elsewhere, a clean exit on SIGTERM)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import tiny_chat_model
from typer.testing import CliRunner
from webapp import client, hidden, login

from lmforge.align.preferences import preference_record, read_preferences
from lmforge.cli import app
from lmforge.finetune.data import Message
from lmforge.label.candidates import read_candidates
from lmforge.label.store import LabelStore

ROOT = Path(__file__).resolve().parents[2]


def lmforge(*args: object):
    """`lmforge label ARGS` in this process. The command points the root logger at the runner's stderr, closed
    on return: the test's own handlers are put back, so the app's later log lines have somewhere to go."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(app, ["label", *map(str, args)])
    finally:
        root.handlers[:], root.level = handlers, level


def _pandalm(path: Path, n: int) -> Path:
    """A PandaLM-shaped file: instruction, input, two responses and three annotators' votes (1, 2 or 0 = tie)."""
    votes = [(1, 1, 2), (2, 2, 2), (0, 0, 1), (2, 1, 2)]
    with path.open("w") as f:
        for i in range(n):
            a1, a2, a3 = votes[i % len(votes)]
            f.write(json.dumps({"idx": i, "instruction": f"Explain thing {i}.", "input": "",
                                "response1": f"first answer {i}", "response2": f"second answer {i}",
                                "annotator1": a1, "annotator2": a2, "annotator3": a3}) + "\n")  # fmt: skip
    return path


def _db_with_users(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    db = tmp_path / "labels.db"
    assert lmforge("init", db).exit_code == 0
    tokens = {}
    for name, role in (("boss", "admin"), ("ann1", "annotator"), ("ann2", "annotator")):
        r = lmforge("user", "add", db, name, "--role", role)
        assert r.exit_code == 0, r.output
        tokens[name] = r.stdout.strip()
    return db, tokens


def test_init_and_user_add_print_a_token_that_logs_in(tmp_path) -> None:
    db, tokens = _db_with_users(tmp_path)
    assert db.is_file()
    assert all(len(t) >= 40 and "\n" not in t for t in tokens.values())  # token_urlsafe(32): 43 characters
    assert len(set(tokens.values())) == 3
    c = client(db)
    login(c, tokens["ann1"])
    assert "ann1 (annotator)" in c.get("/").text
    listed = lmforge("user", "list", db)
    assert listed.stdout.splitlines() == ["boss\tadmin", "ann1\tannotator", "ann2\tannotator"]
    assert lmforge("user", "add", db, "ann1").exit_code == 2  # a name is taken once
    assert lmforge("user", "add", db, "x", "--role", "owner").exit_code == 2
    for command in (("user", "list"), ("serve",)):  # a missing database is refused before any work
        missing = lmforge(*command, tmp_path / "missing.db")
        assert missing.exit_code == 2 and "missing.db" in missing.stderr


def test_rotate_and_disable(tmp_path) -> None:
    db, tokens = _db_with_users(tmp_path)
    new = lmforge("user", "rotate", db, "ann1").stdout.strip()
    c = client(db)
    assert c.post("/login", data={"token": tokens["ann1"]}).status_code == 401
    assert c.post("/login", data={"token": new}).status_code == 303
    assert lmforge("user", "disable", db, "ann2").exit_code == 0
    assert c.post("/login", data={"token": tokens["ann2"]}).status_code == 401
    assert lmforge("user", "list", db).stdout.splitlines()[2] == "ann2\tannotator\tdisabled"
    missing = lmforge("user", "rotate", db, "nobody")
    assert missing.exit_code == 2 and "nobody" in missing.stderr


def test_project_from_a_pandalm_file_then_export_reads_back(tmp_path) -> None:
    db, tokens = _db_with_users(tmp_path)
    items = _pandalm(tmp_path / "pandalm.jsonl", 4)
    checks = _pandalm(tmp_path / "checks.jsonl", 2)
    r = lmforge("project", "create", db, "pl", "--items", items, "--k", "2", "--attention", checks)
    assert r.exit_code == 0, r.output
    project = LabelStore(db).project("pl")
    assert (project.items, project.comparisons, project.attention, project.k) == (4, 4, 2, 2)
    assert lmforge("project", "create", db, "pl", "--items", items).exit_code == 2  # the name is taken

    for name in ("ann1", "ann2"):
        c = client(db)
        csrf = login(c, tokens[name])
        while 'id="vote-form"' in (page := c.get("/p/pl").text):
            r = c.post("/p/pl/vote", data={"assignment": hidden(page, "assignment"), "choice": "left", "csrf": csrf})
            assert r.status_code == 303
    out, csv = tmp_path / "prefs.jsonl", tmp_path / "prefs.csv"
    r = lmforge("export", db, "pl", "-o", out, "--csv", csv)
    assert r.exit_code == 0, r.output
    pairs, skipped = read_preferences(out, ties="keep")
    assert len(pairs) == 4 and skipped.count == 0  # the attention checks are not exported
    assert sorted(p.id for p in pairs) == ["0", "1", "2", "3"]
    assert {p.prompt[-1].content for p in pairs} == {f"Explain thing {i}." for i in range(4)}
    assert len(csv.read_text().strip().splitlines()) == 5
    assert lmforge("export", db, "nosuch", "-o", tmp_path / "x.jsonl").exit_code == 2


def test_results_prints_tables(tmp_path) -> None:
    db, tokens = _db_with_users(tmp_path)
    assert lmforge("project", "create", db, "pl", "--items", _pandalm(tmp_path / "p.jsonl", 4)).exit_code == 0
    for name in ("ann1", "ann2"):
        c = client(db)
        csrf = login(c, tokens[name])
        for _ in range(4):
            assignment = hidden(c.get("/p/pl").text, "assignment")
            r = c.post("/p/pl/vote", data={"assignment": assignment, "choice": "tie", "csrf": csrf})
            assert r.status_code == 303
    r = lmforge("results", db, "pl", "--n-boot", "20")
    assert r.exit_code == 0, r.output
    assert "response1" in r.stdout and "response2" in r.stdout  # the models' ratings
    assert "ann1" in r.stdout and "ann2" in r.stdout
    assert "----" in r.stdout  # tables, not a dump


def test_import_judge_adds_verdicts(tmp_path) -> None:
    db, _ = _db_with_users(tmp_path)
    assert lmforge("project", "create", db, "pl", "--items", _pandalm(tmp_path / "p.jsonl", 3)).exit_code == 0
    records = [preference_record([Message("user", f"Explain thing {i}.")], f"first answer {i}", f"second answer {i}",
                                 "a", {"source": "judge:length", "item_id": str(i),
                                       "models": {"chosen": "response1", "rejected": "response2"}}, str(i))
               for i in range(3)]  # fmt: skip
    path = tmp_path / "judge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n" + '{"id": "x"}\n')
    r = lmforge("import-judge", db, "pl", path, "--judge", "length")
    assert r.exit_code == 0, r.output
    assert "2 bad records" in r.stderr
    verdicts = LabelStore(db).judge_votes("pl")
    assert [(v.judge, v.choice) for v in verdicts] == [("length", "a")] * 3


def test_project_generate_from_two_checkpoints(tmp_path) -> None:
    db, _ = _db_with_users(tmp_path)
    ckpt = tiny_chat_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name a colour {i}."}]}) + "\n"
                               for i in range(3)))  # fmt: skip
    out = tmp_path / "gen.jsonl"
    r = lmforge("project", "generate", db, "gen", "--prompts", prompts, "--checkpoint", f"first={ckpt}",
                "--checkpoint", f"second={ckpt}", "--max-new-tokens", "4", "--temperature", "1.0", "--k", "1",
                "-o", out, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    items, skipped = read_candidates(out)
    assert len(items) + skipped.count == 3 and items
    assert all([x.model for x in item.responses] == ["first", "second"] for item in items)
    project = LabelStore(db).project("gen")
    assert (project.items, project.comparisons, project.k) == (len(items), len(items), 1)
    bad = lmforge("project", "generate", db, "gen2", "--prompts", prompts, "--checkpoint", str(ckpt))
    assert bad.exit_code == 2 and "NAME=DIR" in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_serve_answers_and_exits_cleanly_on_sigterm(tmp_path, host) -> None:
    db, _ = _db_with_users(tmp_path)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "label", "serve", str(db), "--host", host,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json() == {"status": "ok"}
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert ("reachable from other machines" in stderr) == (host == "0.0.0.0")
