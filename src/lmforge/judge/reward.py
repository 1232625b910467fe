"""A reward model as a judge: each reply is scored on its own (lmforge.align.reward_model.score_conversations, the
prompt and the reply through the chat template, as the model was trained), and the higher score wins; scores within
`tie_margin` of each other tie. Each reply's score never sees the other reply, so the order the two are given in
cannot matter: the position bias is 0 by construction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmforge.align.reward_model import RewardModel, load_reward_model, score_conversations
from lmforge.device import resolve_device
from lmforge.finetune.data import Message
from lmforge.judge.base import JudgeItem, Verdict, as_item, by_score
from lmforge.model.io import load_checkpoint_tokenizer
from lmforge.tokenizer import Tokenizer

_UNSCORED = "not scored: the reward model could not render a reply (prompt too long or empty reply)"


class RewardJudge:
    def __init__(self, rm: RewardModel, tokenizer: Tokenizer, name: str = "reward", tie_margin: float = 0.0,
                 batch_size: int = 16) -> None:  # fmt: skip
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        self.rm, self.tok, self.name, self.tie_margin, self.batch_size = rm, tokenizer, name, tie_margin, batch_size

    @classmethod
    def from_dir(cls, directory: Path | str, name: str | None = None, tie_margin: float = 0.0,
                 batch_size: int = 16, device: str = "auto") -> RewardJudge:  # fmt: skip
        rm = load_reward_model(directory, str(resolve_device(device)))
        return cls(rm, load_checkpoint_tokenizer(directory), name or f"reward:{directory}", tie_margin, batch_size)

    def compare_many(self, items: Sequence[JudgeItem | tuple]) -> list[Verdict]:
        """One verdict per item: both replies scored in one pass over all items (similar lengths batched)."""
        items = [as_item(item) for item in items]
        conversations = [[*it.prompt, Message("assistant", reply)] for it in items for reply in (it.a, it.b)]
        scores, index, skipped = score_conversations(self.rm, self.tok, conversations, self.batch_size)
        by_position = dict(zip(index, scores.tolist()))
        reasons = dict(e.split(": ", 1) for e in skipped.examples)
        verdicts = []
        for k in range(len(items)):
            a, b = by_position.get(2 * k), by_position.get(2 * k + 1)
            if a is None or b is None:
                missing = 2 * k if a is None else 2 * k + 1
                verdicts.append(Verdict("tie", {"skipped": reasons.get(f"conversation[{missing}]", _UNSCORED)}))
            else:
                verdicts.append(Verdict(by_score(a, b, self.tie_margin), {"scores": [a, b]}))
        return verdicts
