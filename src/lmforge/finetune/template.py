"""Rendering conversations for SFT (the tokenizer's chat template: `lmforge.chat_template`), loss masks, and
packing of rendered conversations.

lmforge's own tokenizer renders with lmforge's template on its reserved role tokens; an imported model's tokenizer
with the model's own Jinja template (see `lmforge.chat_template` for both, and for what is trained on).

Label convention (the Hugging Face one): `labels` is aligned with `ids`, not shifted. `labels[i]` is `ids[i]` when
token i is a training target and -100 (`IGNORE_INDEX`) when it is not; the model predicts token i from position
i - 1, so the loss is `cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)`. The first token (BOS) is
never a target, which is also what keeps packed conversations apart: no target sits at the first token of a
conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.chat_template import CHAT_TEMPLATE_JINJA, END, ROLE_TOKENS  # noqa: F401  (re-exported)
from lmforge.finetune.data import Conversation
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer

TrainOn = Literal["assistant", "all", "last"]


def render(tok: Tokenizer, conversation: Conversation, train_on: TrainOn = "assistant") -> tuple[list[int], list[int]]:
    """Token ids of `conversation` and their labels (aligned with ids, -100 where no loss; see the module docstring).

    train_on="assistant": each assistant message's content tokens and its end of turn (lmforge's template: its
    `<|end|>` and the final EOS) are targets; "last": only those of the last assistant message; "all": every token
    but the first.
    """
    ids, targets = tok.chat_template.render(conversation, train_on)
    return ids, [t if on else IGNORE_INDEX for t, on in zip(ids, targets)]


def prompt_ids(tok: Tokenizer, conversation: Conversation) -> list[int]:
    """The ids that prompt generation of the next assistant message (lmforge's template: the conversation so far
    + `<|assistant|>`)."""
    return tok.chat_template.prompt_ids(conversation)


@dataclass
class Packed:
    """Rows of exactly seq_len tokens. doc_ids[r][t] is the index, within row r, of the conversation token t
    belongs to; padding gets the index after the row's last conversation, so it attends only to padding."""

    ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    doc_ids: list[list[int]] = field(default_factory=list)
    truncated: int = 0  # conversations longer than seq_len, cut from the right


def pack(rows: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, one_per_row: bool = False) -> Packed:
    """Greedily pack rendered (ids, labels) conversations, in order, into rows of `seq_len`.

    A conversation that does not fit in the current row starts a new one (conversations are never split across
    rows); one longer than seq_len is truncated to its first seq_len tokens and counted in `truncated`. With
    `one_per_row` every conversation starts a new row (padded to seq_len).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    packed = Packed()
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_docs: list[int] = []

    def flush() -> None:
        n_docs = cur_docs[-1] + 1 if cur_docs else 0
        pad = seq_len - len(cur_ids)
        packed.ids.append(cur_ids + [pad_id] * pad)
        packed.labels.append(cur_labels + [IGNORE_INDEX] * pad)
        packed.doc_ids.append(cur_docs + [n_docs] * pad)

    for k, (ids, labels) in enumerate(rows):
        if len(ids) != len(labels):
            raise ValueError(f"conversation {k}: {len(ids)} ids but {len(labels)} labels")
        if not ids:
            raise ValueError(f"conversation {k} is empty")
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            packed.truncated += 1
        if cur_ids and (one_per_row or len(cur_ids) + len(ids) > seq_len):
            flush()
            cur_ids, cur_labels, cur_docs = [], [], []
        doc = cur_docs[-1] + 1 if cur_docs else 0
        cur_ids += ids
        cur_labels += labels
        cur_docs += [doc] * len(ids)
    if cur_ids:
        flush()
    return packed
