"""What the labelling store hands out: plain frozen records (users, sessions, projects, assignments, votes) and the
pure rules behind them (token hashing, the per-annotator left/right flip, the serving order of attention checks).
lmforge.label.store re-exports them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from lmforge.finetune.data import Conversation, Message


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    disabled: bool = False


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    expires: float  # unix time


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    k: int
    seed: int
    rubric: tuple[str, ...]
    items: int  # items to label, attention checks apart
    comparisons: int  # comparisons of those items (one per pair of responses)
    attention: int  # attention-check comparisons
    created: str


@dataclass(frozen=True)
class Assignment:
    """One comparison reserved for one annotator. `left` / `right` are the responses as shown: a / b, or b / a
    when `flipped`. `position` is the annotator's 1-based place in the project, of `total`."""

    id: int
    comparison_id: int
    prompt: Conversation
    left: str
    right: str
    flipped: bool
    position: int
    total: int
    item_id: str = ""
    project: str = ""


@dataclass(frozen=True)
class VoteResult:
    assignment_id: int
    vote_id: int
    choice: str  # "a" | "b" | "tie" | "both_bad", a / b in the item's response order
    left_model: str
    right_model: str


@dataclass(frozen=True)
class Progress:
    done: int  # comparisons this annotator voted on
    total: int  # done + open + still available to them (so done == total when nothing is left)


@dataclass(frozen=True)
class ComparisonRow:
    """One comparison of a project: responses i and j (i < j) of an item, a and b in that order."""

    id: int
    item_id: str
    prompt: Conversation
    model_a: str
    model_b: str
    a: str
    b: str
    is_attention: bool
    label: str | None  # an attention check's known answer


@dataclass(frozen=True)
class VoteRow:
    id: int
    comparison_id: int
    item_id: str
    annotator: str
    model_a: str
    model_b: str
    choice: str  # "a" | "b" | "tie" | "both_bad"
    note: str
    rubric: dict[str, str]
    seconds: float | None
    created: str  # ISO time, UTC
    is_attention: bool
    label: str | None


@dataclass(frozen=True)
class JudgeVoteRow:
    comparison_id: int
    judge: str
    choice: str
    detail: dict[str, Any]


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_flipped(seed: int, comparison_id: int, user_id: int) -> bool:
    """Whether this annotator sees this comparison's responses as b / a: a hash, so it is the same on every
    reload and independent across annotators and comparisons (about half are flipped)."""
    return hashlib.sha256(f"{seed}:{comparison_id}:{user_id}".encode()).digest()[0] & 1 == 1


def serving_order(n_items: int, n_attention: int) -> list[int | None]:
    """The order comparisons are offered in: indices of the regular ones, with None where the next attention
    check goes, spread evenly: the t-th of m after round((t + 1) * n / (m + 1)) regular ones (halves up)."""
    order: list[int | None] = []
    parts = 2 * (n_attention + 1)
    checks_after = Counter((2 * (t + 1) * n_items + n_attention + 1) // parts for t in range(n_attention))
    for r in range(n_items + 1):
        order.extend([None] * checks_after[r])
        if r < n_items:
            order.append(r)
    return order


def conversation(prompt_json: str) -> Conversation:
    return [Message(m["role"], m["content"]) for m in json.loads(prompt_json)]
