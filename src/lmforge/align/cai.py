"""Constitutional AI (Bai et al. 2022) on lmforge models: SL-CAI's critique -> revision loop and its data, and
RL-CAI's AI preference labels.

SL-CAI (`critique_revise`): the model answers each (red-team) prompt; then, for each round, one principle is drawn
(seeded by the run's seed, the prompt's index and the round, so a prompt draws the same principles whatever other
prompts share the call) and the model is shown, as one chat conversation,

    [few-shot examples: prompt, reply, critique request, critique, revision request, revision] ...
    prompt, the current reply, the principle's critique request        -> it writes the critique
    ... + the critique, the principle's revision request                -> it writes the revision

and the revision becomes the current reply of the next round. Every step is kept (`Revision.steps`). Few-shot
examples that do not fit the model's context are left out, the earliest first, and counted; a prompt whose
conversation does not fit even without them is skipped and counted. An empty revision leaves the reply as it was
(the step is kept, marked `degenerate`).

`write_sl_data` writes what the sft and the reward / dpo stages read: an SFT set (messages records, the final
revision as the reply), preference pairs in the `lmforge` format (the revision chosen over the first reply,
provenance {"source": "cai:sl", "principles", "rounds"}), and the whole trace. A prompt whose final reply equals
its first (no round produced a usable revision) gives no record, and is counted.

RL-CAI (`ai_preferences`): two replies per prompt, one principle drawn per comparison, its preference question
put to an LLM judge (lmforge.judge.llm.LLMJudge: choice-token probabilities in both orders); the records carry
provenance {"source": "judge:cai", "principle"}.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.align.constitution import Constitution, Example, Principle
from lmforge.align.preferences import preference_record
from lmforge.align.rollout import prompt_seed
from lmforge.finetune.data import Conversation, Message, Skipped
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import generate
from lmforge.io import atomic_open
from lmforge.judge.base import JudgeItem
from lmforge.judge.llm import LLMJudge
from lmforge.model.modes import evaluating
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SFT_FILE, PAIRS_FILE, TRACE_FILE = "sl_sft.jsonl", "sl_pairs.jsonl", "sl_trace.jsonl"
# The generations of one prompt: its first reply, then per round a critique and a revision (seed parts).
_INITIAL, _CRITIQUE, _REVISION = 0, 1, 2


@dataclass
class Step:
    """One round: the principle drawn, the requests shown and what the model wrote."""

    principle: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    few_shot: int  # examples that fitted the context
    degenerate: bool = False  # an empty revision: the reply stayed as it was


@dataclass
class Revision:
    """A prompt, the model's first reply, and every critique -> revision round."""

    id: str
    prompt: Conversation
    initial: str
    steps: list[Step] = field(default_factory=list)

    @property
    def final(self) -> str:
        """The last usable revision, or the first reply when no round produced one."""
        kept = [s.revision for s in self.steps if not s.degenerate]
        return kept[-1] if kept else self.initial


def example_messages(example: Example) -> Conversation:
    """A few-shot example as the turns of a chat: the prompt, the reply, the critique and the revision exchanges."""
    return [*example.prompt, Message("assistant", example.response), Message("user", example.critique_request),
            Message("assistant", example.critique), Message("user", example.revision_request),
            Message("assistant", example.revision)]  # fmt: skip


def critique_conversation(prompt: Conversation, response: str, principle: Principle,
                          examples: Sequence[Example] = ()) -> Conversation:  # fmt: skip
    """The conversation that asks for a critique of `response` under `principle`, after the few-shot examples (a
    system message of the prompt stays first)."""
    system = [m for m in prompt[:1] if m.role == "system"]
    shots = [m for ex in examples for m in example_messages(ex)]
    return [*system, *shots, *prompt[len(system) :], Message("assistant", response),
            Message("user", principle.critique or "")]  # fmt: skip


def revision_conversation(critique_conv: Conversation, critique: str, principle: Principle) -> Conversation:
    """The critique conversation continued by the critique and the principle's revision request."""
    return [*critique_conv, Message("assistant", critique), Message("user", principle.revision or "")]


def draw_principle(principles: Sequence[Principle], seed: int, index: int, round: int) -> Principle:
    """The principle prompt `index` critiques by in `round`: seeded by (seed, index, round) alone."""
    return random.Random(prompt_seed(seed, index, round)).choice(list(principles))


class _Sampler:
    """Replies from `model` to chat conversations, each drawn with its own seed, within the model's context."""

    def __init__(self, model: nn.Module, tok: Tokenizer, max_new_tokens: int, temperature: float) -> None:
        self.model, self.tok, self.max_new_tokens, self.temperature = model, tok, max_new_tokens, temperature
        self.room = model.args.max_seq_len - max_new_tokens

    def fits(self, conversation: Conversation, reserved: int = 0) -> bool:
        """Whether a reply can follow `conversation` with `reserved` more tokens in it (a critique still to come)."""
        return len(prompt_ids(self.tok, conversation)) + reserved <= self.room

    def reply(self, conversation: Conversation, seed: int) -> str:
        ids = prompt_ids(self.tok, conversation)
        out = generate(self.model, [ids], self.max_new_tokens, temperature=self.temperature, seed=seed,
                       stop_ids=self.tok.stop_ids)[0]  # fmt: skip
        return self.tok.decode(out, skip_special_tokens=True).strip()


def _fitting(sampler: _Sampler, prompt: Conversation, response: str, principle: Principle,
             examples: Sequence[Example]) -> tuple[Conversation, int] | None:  # fmt: skip
    """The critique conversation with as many few-shot examples as fit (the latest kept), leaving room for the
    critique and, after it, the revision; None when it does not fit with none."""
    for start in range(len(examples) + 1):
        shots = examples[start:]
        conv = critique_conversation(prompt, response, principle, shots)
        # The revision's prompt adds the critique (at most max_new_tokens) and the revision request.
        if sampler.fits(revision_conversation(conv, "", principle), reserved=sampler.max_new_tokens):
            return conv, len(shots)
    return None


def critique_revise(model: nn.Module, tok: Tokenizer, prompts: Sequence[Conversation], constitution: Constitution,
                    *, rounds: int = 1, seed: int = 0, max_new_tokens: int = 64, temperature: float = 0.7,
                    few_shot: int = 2, ids: Sequence[str] | None = None,
                    skipped: Skipped | None = None) -> list[Revision]:  # fmt: skip
    """SL-CAI: each prompt's first reply, then `rounds` critique -> revision rounds under principles drawn from
    `constitution` (with up to `few_shot` of its examples). Prompts that cannot fit are counted in `skipped`."""
    principles = constitution.critique_principles()
    if not principles:
        raise ValueError(f"constitution {constitution.name!r} has no principle with a critique and a revision request")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least one critique -> revision round")
    examples = constitution.few_shot[:few_shot]
    sampler = _Sampler(model, tok, max_new_tokens, temperature)
    skipped = skipped if skipped is not None else Skipped()
    out = []
    with evaluating(model):
        for i, prompt in enumerate(prompts):
            item_id = ids[i] if ids is not None else str(i)
            if not sampler.fits(prompt):
                skipped.add(item_id, f"prompt too long: no room for a {max_new_tokens}-token reply in the context")
                continue
            rev = Revision(item_id, list(prompt), sampler.reply(prompt, prompt_seed(seed, i, 0, _INITIAL)))
            for r in range(1, rounds + 1):
                principle = draw_principle(principles, seed, i, r)
                fitted = _fitting(sampler, prompt, rev.final, principle, examples)
                if fitted is None:  # earlier rounds stay; a prompt with none is left out
                    skipped.add(item_id, f"critique too long: round {r}'s critique and revision prompts leave no "
                                f"room for {max_new_tokens} tokens in the context")  # fmt: skip
                    break
                conv, shots = fitted
                critique = sampler.reply(conv, prompt_seed(seed, i, r, _CRITIQUE))
                revision = sampler.reply(revision_conversation(conv, critique, principle),
                                         prompt_seed(seed, i, r, _REVISION))  # fmt: skip
                rev.steps.append(Step(principle.name, principle.critique or "", critique, principle.revision or "",
                                      revision, shots, degenerate=not revision))  # fmt: skip
            if rev.steps:
                out.append(rev)
    return out


def _messages(conversation: Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conversation]


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Records as JSON Lines, written atomically (the folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_sl_data(revisions: Sequence[Revision], out: Path | str) -> dict[str, Any]:
    """Write out/sl_sft.jsonl (messages records: the prompt and the final revision), out/sl_pairs.jsonl (`lmforge`
    preference records: the final revision chosen over the first reply) and out/sl_trace.jsonl (every step);
    returns the counts. A prompt with no revision that differs from its first reply gives no SFT or pair record."""
    out = Path(out)
    sft, pairs = [], []
    unchanged = degenerate = 0
    for rev in revisions:
        degenerate += sum(s.degenerate for s in rev.steps)
        if rev.final.strip() == rev.initial.strip():
            unchanged += 1
            continue
        sft.append({"id": rev.id, "messages": [*_messages(rev.prompt), {"role": "assistant", "content": rev.final}]})
        provenance = {"source": "cai:sl", "item_id": rev.id, "principles": [s.principle for s in rev.steps],
                      "rounds": len(rev.steps), "models": {"chosen": "revision", "rejected": "initial"}}  # fmt: skip
        pairs.append(preference_record(rev.prompt, rev.initial, rev.final, "b", provenance, rev.id))
    write_jsonl(out / SFT_FILE, sft)
    write_jsonl(out / PAIRS_FILE, pairs)
    write_jsonl(out / TRACE_FILE, [{"id": r.id, "prompt": _messages(r.prompt), "initial": r.initial,
                                     "steps": [asdict(s) for s in r.steps], "final": r.final} for r in revisions])
    if unchanged:
        log.warning("SL-CAI: %d of %d prompts have no usable revision (empty, or the same as the first reply): no "
                    "SFT record or pair for them", unchanged, len(revisions))  # fmt: skip
    return {"revisions": len(revisions), "sft_records": len(sft), "pairs": len(pairs), "unchanged": unchanged,
            "degenerate_steps": degenerate}  # fmt: skip


def ai_preferences(judge_model: nn.Module, tok: Tokenizer, items: Sequence[JudgeItem], constitution: Constitution,
                   seed: int = 0, skipped: Skipped | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """RL-CAI labels: for item i, a principle drawn by (seed, i) and its preference question asked of an LLM judge
    on `judge_model`; `lmforge`-format records with provenance {"source": "judge:cai", "principle": name}. Items
    the judge cannot fit are counted in `skipped` (with their id, meta["id"], or their index)."""
    principles = constitution.preference_principles()
    if not principles:
        raise ValueError(f"constitution {constitution.name!r} has no principle with a preference question")
    drawn = [random.Random(prompt_seed(seed, i)).choice(principles) for i in range(len(items))]
    verdicts: list[Any] = [None] * len(items)
    for principle in {p.name: p for p in drawn}.values():  # one judge per principle, in order of first draw
        judge = LLMJudge(judge_model, tok, principle.preference or "", f"cai:{principle.name}")
        index = [i for i, p in enumerate(drawn) if p.name == principle.name]
        for i, verdict in zip(index, judge.compare_many([items[i] for i in index])):
            verdicts[i] = verdict
    skipped = skipped if skipped is not None else Skipped()
    records = []
    for i, (item, principle, verdict) in enumerate(zip(items, drawn, verdicts)):
        item_id = str(item.meta.get("id", i))
        if verdict.skipped:
            skipped.add(item_id, f"judge: {verdict.skipped}")
            continue
        provenance = {"source": "judge:cai", "principle": principle.name, "item_id": item_id,
                      **{k: verdict.detail[k] for k in ("p_a", "p_a_first", "p_a_second") if k in verdict.detail}}
        records.append(preference_record(item.prompt, item.a, item.b, verdict.choice, provenance, item_id))
    return records
