"""What every judge shares: the item it compares, the verdict it gives, the length baseline, the position-bias rate,
and the `lmforge` preference record a verdict becomes.

A judge is any object with a `name` and `compare_many(items) -> list[Verdict]`, one verdict per item, in order. An
item is a prompt and two replies, `a` and `b`, with an optional reference (a verifier's answer or tests); a verdict
says which reply is better ("a", "b" or "tie") and keeps what the judge saw in `detail`. A judge that cannot judge an
item (a prompt longer than its context) gives a tie whose detail holds `skipped` (the reason); the writer skips and
counts it rather than recording a made-up preference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from lmforge.align.preferences import preference_record
from lmforge.finetune.data import Conversation

CHOICES = ("a", "b", "tie")


class JudgeItem(NamedTuple):
    """Replies `a` and `b` to `prompt` (a conversation ending with a user message); `reference` is what a verifier
    checks a reply against (a GSM8K answer, MBPP asserts); `meta` more of the item's data a verifier may read."""

    prompt: Conversation
    a: str
    b: str
    reference: str | None = None
    meta: dict[str, Any] = {}


@dataclass
class Verdict:
    """The judge's decision on one item and what it saw (probabilities, scores, rewards)."""

    choice: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.choice not in CHOICES:
            raise ValueError(f"a verdict's choice must be one of {list(CHOICES)}, got {self.choice!r}")

    @property
    def skipped(self) -> str | None:
        """Why the judge could not judge the item, or None."""
        return self.detail.get("skipped")

    @property
    def p_a_first(self) -> float | None:
        """An LLM judge's probability that `a` is better when shown first (None for other judges)."""
        return self.detail.get("p_a_first")

    @property
    def p_a_second(self) -> float | None:
        """An LLM judge's probability that `a` is better when shown second (None for other judges)."""
        return self.detail.get("p_a_second")


class Judge(Protocol):
    name: str

    def compare_many(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


def by_score(score_a: float, score_b: float, margin: float = 0.0) -> str:
    """"a" or "b" when its score leads by more than `margin`, else "tie"."""
    if score_a - score_b > margin:
        return "a"
    if score_b - score_a > margin:
        return "b"
    return "tie"


class LengthJudge:
    """The longer reply (in characters) wins; equal lengths tie. The baseline every judge is shown against: people
    and reward models alike often prefer longer replies, so a judge that does not beat it has learned little else."""

    name = "length"

    def compare_many(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(by_score(len(it.a), len(it.b)), {"lengths": [len(it.a), len(it.b)]})
                for it in map(as_item, items)]  # fmt: skip


def as_item(item: JudgeItem | tuple) -> JudgeItem:
    """An item given as a plain (prompt, a, b[, reference, meta]) tuple, as a JudgeItem."""
    return item if isinstance(item, JudgeItem) else JudgeItem(*item)


def position_bias_rate(verdicts: Sequence[Verdict]) -> float | None:
    """The share of judged items where an LLM judge picked the same position (first or second) in both orders,
    i.e. where the order, not the replies, decided; None when no verdict has both orders' probabilities. With two
    positions, picking the same one in both orders is exactly the two orders disagreeing about the reply."""
    both = [v for v in verdicts if v.p_a_first is not None and v.p_a_second is not None]
    if not both:
        return None
    same = sum((v.p_a_first > 0.5 > v.p_a_second) or (v.p_a_first < 0.5 < v.p_a_second) for v in both)
    return same / len(both)


def verdict_record(item: JudgeItem, verdict: Verdict, judge: str, *, item_id: str | None = None,
                   models: tuple[str, str] = ("a", "b"), id: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The `lmforge` preference record of a verdict on `item` (replies of `models` in the item's order), with its
    provenance: source "judge:<name>", the item's id, the models as chosen / rejected, and the judge's one vote
    carrying its detail."""
    source = f"judge:{judge}"
    chosen, rejected = models[::-1] if verdict.choice == "b" else models
    provenance = {"source": source, "item_id": item_id, "models": {"chosen": chosen, "rejected": rejected},
                  "votes": [{"annotator": source, "choice": verdict.choice, **verdict.detail}]}  # fmt: skip
    return preference_record(item.prompt, item.a, item.b, verdict.choice, provenance, id)
