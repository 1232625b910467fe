"""A verifier as a judge: one of the RL reward functions (lmforge.align.rewards: `gsm8k_answer`, `mbpp_tests`,
`doctests`, ...) scores each reply against the item's reference, and the higher reward wins; equal rewards tie.
Code runs only in the rewards' sandbox. Like the reward-model judge it scores each reply alone, so the order of the
two cannot matter.

The reference fills the meta key the reward reads (`REFERENCE_KEYS`): a GSM8K answer, MBPP asserts (one per line),
a docstring prompt; a reference that is a JSON object is merged into the meta as it is (e.g. {"tests": [...],
"test_setup": "..."}). An item whose meta still lacks the key is skipped and counted, not scored 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lmforge.align.prompts import PromptItem
from lmforge.align.rewards import REWARDS, Sample
from lmforge.judge.base import JudgeItem, Verdict, as_item, by_score

# reward -> the meta key it reads (None: it needs no reference)
REFERENCE_KEYS: dict[str, str | None] = {"gsm8k_answer": "answer", "mbpp_tests": "tests", "doctests": "code_prompt",
                                         "completes_function": "code_prompt", "reference_similarity": "reference",
                                         "code_parses": None, "ends_turn": None}  # fmt: skip


def item_meta(item: JudgeItem, key: str | None) -> dict[str, Any]:
    """The item's meta with its reference under `key` (see the module docstring)."""
    meta = dict(item.meta)
    ref = item.reference
    if ref is None or key is None:
        return meta
    try:
        parsed = json.loads(ref)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return {**meta, **parsed}
    if key == "tests":
        return {**meta, "tests": [line for line in ref.splitlines() if line.strip()]}
    return {**meta, key: ref}


class VerifierJudge:
    def __init__(self, reward: str, name: str | None = None, **options: Any) -> None:
        if reward not in REFERENCE_KEYS:
            raise ValueError(f"unknown verifier {reward!r}; expected one of {sorted(REFERENCE_KEYS)} "
                             "(lmforge.align.rewards; 'length' is the length judge)")  # fmt: skip
        self.key, self.name, self.fn = REFERENCE_KEYS[reward], name or f"verifier:{reward}", REWARDS[reward](**options)

    def compare_many(self, items: Sequence[JudgeItem | tuple]) -> list[Verdict]:
        """One verdict per item; every reply of every checkable item is scored in one call (one sandbox pass)."""
        items = [as_item(item) for item in items]
        metas = [item_meta(item, self.key) for item in items]
        checkable = [k for k, meta in enumerate(metas) if self.key is None or meta.get(self.key)]
        samples = [Sample(PromptItem(items[k].prompt, metas[k]), reply, True, 0)
                   for k in checkable for reply in (items[k].a, items[k].b)]  # fmt: skip
        rewards = self.fn(samples) if samples else []
        missing = f"no reference: {self.name} needs the item's {self.key!r} (its reference or meta)"
        verdicts = [Verdict("tie", {"skipped": missing}) for _ in items]
        for n, k in enumerate(checkable):
            a, b = rewards[2 * n], rewards[2 * n + 1]
            verdicts[k] = Verdict(by_score(a, b), {"rewards": [a, b]})
        return verdicts
