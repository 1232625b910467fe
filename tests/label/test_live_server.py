"""The labelling app as its users meet it: `lmforge label serve` in a subprocess on 127.0.0.1, annotators voting at
once over HTTP, each with its own session; the server SIGKILLed at random moments and restarted on the same file;
and a graceful SIGTERM. Every vote the server acknowledged (303) must be in the database afterwards, exactly once,
and no comparison may get more than its k votes."""

import random
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from live import ACKNOWLEDGED, HOST, Annotator, Server, listening_addresses, make_db, synthetic_items

CHOICES = ("left", "right", "tie", "both_bad")
STORED = {("left", 0): "a", ("right", 0): "b", ("left", 1): "b", ("right", 1): "a"}  # (choice, flipped) -> a/b


@dataclass(frozen=True)
class Ack:
    annotator: str
    assignment: int
    choice: str  # as posted: left|right|tie|both_bad


def stored_votes(db: Path) -> dict[int, tuple[str, int, str]]:
    """Every vote in the file, read once the server is stopped: assignment id -> (annotator, comparison id, choice
    as the annotator saw it: left|right|tie|both_bad)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT v.assignment_id, u.name, v.comparison_id, v.choice, a.flipped FROM votes v "
                            "JOIN users u ON u.id = v.user_id JOIN assignments a ON a.id = v.assignment_id").fetchall()
    seen = {(stored, flipped): choice for (choice, flipped), stored in STORED.items()}
    return {a: (name, c, seen.get((choice, flipped), choice)) for a, name, c, choice, flipped in rows}


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


class Voters:
    """One thread per annotator, each logging in and voting (random choices) until the project has nothing left
    for it. With `retry`, a lost connection (the server killed) is retried until the server is back; otherwise it
    ends that annotator's run."""

    def __init__(self, url: str, project: str, tokens: dict[str, str], *, retry: bool, deadline_s: float) -> None:
        self.url, self.project, self.retry = url, project, retry
        self.deadline = time.monotonic() + deadline_s
        self.acks: list[Ack] = []
        self.lost = 0  # requests that got no answer (the server was down or died before replying)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(name, token, seed)) for seed, (name, token)
                        in enumerate(tokens.items())]  # fmt: skip

    def start(self) -> "Voters":
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self.threads:
            t.join()
        assert not self.failures, self.failures

    def _run(self, name: str, token: str, seed: int) -> None:
        rng, client = random.Random(seed), Annotator(self.url, token)
        logged_in = False
        try:
            while time.monotonic() < self.deadline:
                try:
                    if not logged_in:
                        client.login()
                        logged_in = True
                    page = client.page(self.project)
                    if page.assignment is None:
                        return
                    choice = rng.choice(CHOICES)
                    r = client.vote(self.project, page, choice)
                    assert r.status_code in ACKNOWLEDGED, f"{name}: vote answered {r.status_code}: {r.text[:200]}"
                    self.acks.append(Ack(name, int(page.assignment), choice))
                except httpx.TransportError:
                    self.lost += 1
                    if not self.retry:
                        return
                    time.sleep(0.05)
            self.failures.append(f"{name} still voting at the deadline")
        except AssertionError as e:
            self.failures.append(str(e))
        finally:
            client.close()


def check_votes(db: Path, acks: list[Ack], k: int, n_comparisons: int | None) -> dict[int, tuple[str, int, str]]:
    """Every acknowledged vote is stored as posted; nobody voted twice on a comparison; none has more than k votes
    (exactly k each when n_comparisons is given: the project was finished)."""
    stored = stored_votes(db)
    for ack in acks:
        assert ack.assignment in stored, f"acknowledged vote lost: {ack}"
        name, _, choice = stored[ack.assignment]
        assert (name, choice) == (ack.annotator, ack.choice), (ack, stored[ack.assignment])
    assert len({ack.assignment for ack in acks}) == len(acks), "the server acknowledged one assignment twice"
    pairs = [(name, c) for name, c, _ in stored.values()]
    assert len(set(pairs)) == len(pairs), "an annotator voted twice on one comparison"
    per_comparison = Counter(c for _, c, _ in stored.values())
    assert max(per_comparison.values()) <= k
    if n_comparisons is not None:
        assert len(per_comparison) == n_comparisons and set(per_comparison.values()) == {k}
    assert integrity(db) == "ok"
    return stored


def test_32_annotators_at_once_lose_and_duplicate_nothing(tmp_path):
    live = make_db(tmp_path, synthetic_items(12), annotators=32, k=3)  # 36 comparisons, 108 votes for 32 people
    annotators = {name: token for name, token in live.tokens.items() if name != "admin"}
    with Server(live.path, tmp_path / "server.log") as server:
        assert listening_addresses(server.port) == {HOST}, "the server must listen on loopback only"
        start = time.monotonic()
        voters = Voters(server.url, live.project, annotators, retry=False, deadline_s=60)
        voters.start().join()
        elapsed = time.monotonic() - start
    assert elapsed <= 60
    stored = check_votes(live.path, voters.acks, live.k, live.n_comparisons)
    assert len(stored) == len(voters.acks) == live.n_comparisons * live.k
    assert len({ack.annotator for ack in voters.acks}) > live.k, "the votes should spread over many annotators"


def vote_through_kills(tmp_path: Path, *, n_items: int, annotators: int, kills: int, seed: int) -> None:
    """Annotators vote while the server is SIGKILLed `kills` times, at moments the seed picks among the votes,
    and restarted on the same file; the file is checked after every kill and at the end."""
    live = make_db(tmp_path, synthetic_items(n_items), annotators=annotators, k=2)
    tokens = {name: token for name, token in live.tokens.items() if name != "admin"}
    total, rng = live.n_comparisons * live.k, random.Random(seed)
    server = Server(live.path, tmp_path / "server.log").start()
    voters = Voters(server.url, live.project, tokens, retry=True, deadline_s=60 + 10 * kills).start()
    acked_at_kill = []
    for threshold in sorted(rng.sample(range(5, total - 5), kills)):
        while len(voters.acks) < threshold and time.monotonic() < voters.deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))  # a random phase of the requests in flight
        server.kill()
        acked_at_kill.append(len(voters.acks))
        check_votes(live.path, list(voters.acks), live.k, None)  # the file as the killed server left it
        server.start()
    voters.join()
    server.stop()
    assert acked_at_kill[-1] < total, f"the kills should land mid-run: {acked_at_kill}"
    assert voters.lost > 0, "the kills should cut annotators off"
    check_votes(live.path, voters.acks, live.k, live.n_comparisons)


def test_sigkill_at_random_moments_loses_no_acknowledged_vote(tmp_path):
    vote_through_kills(tmp_path, n_items=10, annotators=8, kills=2, seed=17)  # 30 comparisons, 60 votes


@pytest.mark.slow
def test_sigkill_many_times_under_more_annotators(tmp_path):
    vote_through_kills(tmp_path, n_items=30, annotators=16, kills=8, seed=18)  # 90 comparisons, 180 votes


def test_sigterm_exits_0_and_leaves_a_consistent_file(tmp_path):
    live = make_db(tmp_path, synthetic_items(20), annotators=4, k=2)  # 120 votes: still voting at the signal
    annotators = {name: token for name, token in live.tokens.items() if name != "admin"}
    server = Server(live.path, tmp_path / "server.log").start()
    voters = Voters(server.url, live.project, annotators, retry=False, deadline_s=60).start()
    deadline = time.monotonic() + 30
    while len(voters.acks) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stop(timeout=10) == 0, server.log_tail()
    voters.join()
    stored = check_votes(live.path, voters.acks, live.k, None)
    assert len(voters.acks) < live.n_comparisons * live.k, "the signal should land mid-run"
    assert set(stored) == {ack.assignment for ack in voters.acks}, "a vote the server stored but never acknowledged"
