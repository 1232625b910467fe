"""Data the labelling-store tests share (test_store.py, test_store_concurrency.py, test_export.py,
test_results.py): candidate items built in memory and a store with annotators."""

from __future__ import annotations

from pathlib import Path

from lmforge.finetune.data import Message
from lmforge.label.candidates import Candidate, Response
from lmforge.label.store import LabelStore, User


def items(n: int, models: tuple[str, ...] = ("m1", "m2"), prefix: str = "p") -> list[Candidate]:
    """`n` items, each answered by every model with a reply naming the item and the model."""
    return [Candidate(f"{prefix}{i}", [Message("user", f"question {i}")],
                      [Response(m, f"{m} answers {i}") for m in models]) for i in range(n)]  # fmt: skip


def checks(labels: list[str]) -> list[Candidate]:
    """Attention checks with known answers `labels` ("a": the first response is right)."""
    return [Candidate(f"check{i}", [Message("user", f"what is {i} + {i}?")],
                      [Response("good", str(2 * i)), Response("bad", str(2 * i + 1))], meta={"label": label})
            for i, label in enumerate(labels)]  # fmt: skip


def store_with(path: Path, names: list[str], **kwargs) -> tuple[LabelStore, dict[str, User]]:
    """A new store at `path` with annotators `names` (their User records by name)."""
    store = LabelStore(path, create=True, **kwargs)
    users = {name: store.user_by_token(store.add_user(name)) for name in names}
    return store, users


def label_all(store: LabelStore, project: str, user: User, choose) -> int:
    """Let `user` vote on every comparison offered to them, choosing with choose(assignment) ("left", ...);
    returns how many votes they cast."""
    n = 0
    while (assignment := store.next_assignment(project, user)) is not None:
        store.vote(assignment.id, user, choose(assignment))
        n += 1
    return n


def click(assignment, want: str) -> str:
    """The side an annotator clicks to vote `want` (a / b in the item's order, or tie / both_bad) on what they were
    shown."""
    if want not in ("a", "b"):
        return want
    return "left" if (want == "a") != assignment.flipped else "right"
