"""An LLM as a judge: any lmforge checkpoint (an imported Hugging Face model is one too) reads a judging prompt and
the probabilities of its first reply token say which of two replies is better.

The judging prompt is one user message, rendered through the model's own chat template: the instruction (a rubric,
or one principle of a constitution), the question (the conversation so far) and the two replies labelled A and B,
ending with a request to answer A or B. The judge reads the log-probabilities of the choice tokens (the first token
of "A" and of "B") at the first position of the assistant's reply. Small models prefer one position whatever the
replies say, so every item is shown in both orders, A/B and B/A, in one batched forward (rows right-padded, each
read at its last real position: causal attention keeps padding from reaching it):

    p_a_first  = P(A) / (P(A) + P(B)) with a shown first     (a is "A")
    p_a_second = P(B) / (P(A) + P(B)) with a shown second    (a is "B")
    p_a        = (p_a_first + p_a_second) / 2

Both above 0.5: a wins; both below: b wins; otherwise the orders disagree (the position decided, not the replies)
and the item is a tie. A prompt longer than the model's context has its replies cut (never the question or the
instruction), both by the same rule so neither is favoured, and counted.

    judge = LLMJudge.from_checkpoint("runs/x/sft/final", DEFAULT_RUBRIC)
    verdict = judge.compare(prompt, reply_a, reply_b)   # Verdict(choice, detail), verdict.p_a_first, ...
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lmforge.finetune.classify import right_pad
from lmforge.finetune.data import Conversation, Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.loading import load_for_generation
from lmforge.judge.base import JudgeItem, Verdict, as_item
from lmforge.model.modes import evaluating
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_RUBRIC = ("Which reply answers the user better? A better reply is helpful, correct and honest, and does "
                  "no harm.")  # fmt: skip
CHOICE_TEXTS = ("A", "B")
_FIT_TRIES = 8  # re-encoding cut replies can merge tokens differently; a few tries always converge


def question_text(prompt: Conversation) -> str:
    """The conversation the replies answer, as text: a lone user message as it is, longer ones turn by turn."""
    if len(prompt) == 1:
        return prompt[0].content
    return "\n".join(f"{m.role.capitalize()}: {m.content}" for m in prompt)


def judging_message(instruction: str, question: str, first: str, second: str) -> str:
    """The user message asking the judge to compare reply A (`first`) with reply B (`second`)."""
    return (f"{instruction}\n\nQuestion:\n{question}\n\nReply A:\n{first}\n\nReply B:\n{second}\n\n"
            "Which reply is better? Answer with one letter, A or B.")  # fmt: skip


def tokenizer_origin(tok: Tokenizer) -> str:
    return str(tok.imported.source) if tok.imported is not None else "lmforge's own tokenizer"


def choice_token_ids(tok: Tokenizer) -> tuple[int, int]:
    """The first token of "A" and of "B"; a clear error when the tokenizer cannot tell them apart."""
    ids = [tok.encode(text) for text in CHOICE_TEXTS]
    if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
        raise ValueError(f"the tokenizer ({tokenizer_origin(tok)}) encodes the choices {list(CHOICE_TEXTS)} as {ids}:"
                         " their first tokens must exist and differ for an LLM judge to read them")  # fmt: skip
    return ids[0][0], ids[1][0]


class LLMJudge:
    """Compares two replies by the choice-token probabilities of `model` (an lmforge Transformer) under the judging
    prompt built from `instruction`; see the module docstring. `truncated` counts items whose replies were cut."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, instruction: str = DEFAULT_RUBRIC, name: str = "llm",
                 batch_size: int = 8) -> None:  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tok, self.instruction, self.name = model, tokenizer, instruction, name
        self.batch_size = batch_size
        self.choice_ids = choice_token_ids(tokenizer)
        self.max_len = model.args.max_seq_len
        self.truncated = 0

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str, instruction: str = DEFAULT_RUBRIC, name: str | None = None,
                        device: str = "auto", batch_size: int = 8) -> LLMJudge:  # fmt: skip
        model, tok = load_for_generation(checkpoint, device)
        return cls(model, tok, instruction, name or f"llm:{checkpoint}", batch_size)

    def compare(self, prompt: Conversation, a: str, b: str) -> Verdict:
        return self.compare_many([JudgeItem(prompt, a, b)])[0]

    def compare_many(self, items: Sequence[JudgeItem | tuple]) -> list[Verdict]:
        """One verdict per item, in order; items of similar length share a forward."""
        fitted = [self._rows(item) for item in map(as_item, items)]
        verdicts = [Verdict("tie", {"skipped": f}) if isinstance(f, str) else None for f in fitted]
        todo = sorted((i for i, f in enumerate(fitted) if not isinstance(f, str)), key=lambda i: len(fitted[i][0]))
        self.truncated += sum(fitted[i][2] for i in todo)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            logprobs = self._choice_logprobs([seq for i in chunk for seq in fitted[i][:2]])
            for k, i in enumerate(chunk):
                verdicts[i] = decide(logprobs[2 * k].tolist(), logprobs[2 * k + 1].tolist(), fitted[i][2])
        return verdicts  # type: ignore[return-value]  # every item is skipped or judged

    def _ids(self, question: str, first: str, second: str) -> list[int]:
        message = judging_message(self.instruction, question, first, second)
        return prompt_ids(self.tok, [Message("user", message)])

    def _rows(self, item: JudgeItem) -> tuple[list[int], list[int], bool] | str:
        """The two orders' ids, and whether the replies were cut to fit the context; or why the item cannot fit."""
        question, a, b = question_text(item.prompt), item.a, item.b
        first, second = self._ids(question, a, b), self._ids(question, b, a)
        if max(len(first), len(second)) <= self.max_len:
            return first, second, False
        bare = max(len(self._ids(question, "", "")), 1)
        if bare >= self.max_len:
            return (f"prompt too long: the judging prompt without the replies is {bare} tokens, the model's context "
                    f"{self.max_len}")  # fmt: skip
        a_ids, b_ids = self.tok.encode(a), self.tok.encode(b)
        budget = self.max_len - bare
        for _ in range(_FIT_TRIES):
            cap = _cap(len(a_ids), len(b_ids), budget)
            cut_a, cut_b = self.tok.decode(a_ids[:cap]), self.tok.decode(b_ids[:cap])
            first, second = self._ids(question, cut_a, cut_b), self._ids(question, cut_b, cut_a)
            over = max(len(first), len(second)) - self.max_len
            if over <= 0:
                return first, second, True
            budget -= over
        return f"replies do not fit: still {over} tokens over the model's context {self.max_len} after cutting them"

    @torch.no_grad()
    def _choice_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        """[len(seqs), 2] log-probabilities (fp32) of the choice tokens at each row's last real position."""
        device = next(self.model.parameters()).device
        batch, lengths = right_pad(seqs, self.tok.pad_id)
        with evaluating(self.model):  # a model in training (RL-CAI's) goes back to its mode after
            logits = self.model(batch.to(device))
        last = logits[torch.arange(len(seqs), device=device), lengths.to(device) - 1].float()
        return torch.log_softmax(last, dim=-1)[:, list(self.choice_ids)].cpu()


def _cap(len_a: int, len_b: int, budget: int) -> int:
    """The largest per-reply token cap c with min(len_a, c) + min(len_b, c) <= budget: the longer reply is cut
    first, and both are cut to the same length when both must be."""
    short = min(len_a, len_b)
    if 2 * short >= budget:
        return max(budget // 2, 0)
    return budget - short


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def decide(first: Sequence[float], second: Sequence[float], truncated: bool = False) -> Verdict:
    """The verdict from the choice tokens' log-probabilities [A, B] with a shown first and with a shown second."""
    p_a_first = _sigmoid(first[0] - first[1])
    p_a_second = _sigmoid(second[1] - second[0])
    if p_a_first > 0.5 and p_a_second > 0.5:
        choice = "a"
    elif p_a_first < 0.5 and p_a_second < 0.5:
        choice = "b"
    else:
        choice = "tie"
    detail = {"p_a": (p_a_first + p_a_second) / 2, "p_a_first": p_a_first, "p_a_second": p_a_second,
              "logprobs_first": [float(x) for x in first], "logprobs_second": [float(x) for x in second]}  # fmt: skip
    if truncated:
        detail["truncated"] = True
    return Verdict(choice, detail)
