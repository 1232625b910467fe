"""The chat template on the tokenizer's reserved role tokens, loss masks, and packing of rendered conversations.

A conversation renders as
    <|bos|> <|role|> content <|end|> <|role|> content <|end|> ... [<|eos|> after a final assistant message]
with the role and control ids inserted directly (never through `encode`, so text in the data cannot forge them).
The final EOS teaches generation to stop; a prompt for generation is the conversation so far + `<|assistant|>`.

Label convention (the Hugging Face one): `labels` is aligned with `ids`, not shifted. `labels[i]` is `ids[i]` when
token i is a training target and -100 (`IGNORE_INDEX`) when it is not; the model predicts token i from position
i - 1, so the loss is `cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)`. BOS is never a target,
which is also what keeps packed conversations apart: no target sits at the first token of a conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.finetune.data import Conversation
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer

TrainOn = Literal["assistant", "all", "last"]
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"

# The same template for Hugging Face `tokenizer_config.json` (`chat_template`). One line, so that transformers'
# trim_blocks / lstrip_blocks never add or remove whitespace. With add_generation_prompt it ends in <|assistant|>;
# without, a final assistant message gets the EOS, exactly like `render`.
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% elif messages and messages[-1]['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}"
)


def _special(tok: Tokenizer, token: str) -> int:
    found = tok.token_to_id(token)
    if found is None:
        raise ValueError(f"tokenizer lacks the chat token {token!r}; retrain it with the tokenizer stage")
    return found


def render(tok: Tokenizer, conversation: Conversation, train_on: TrainOn = "assistant") -> tuple[list[int], list[int]]:
    """Token ids of `conversation` and their labels (aligned with ids, -100 where no loss; see the module docstring).

    train_on="assistant": each assistant message's content tokens, its `<|end|>` and the final EOS are targets;
    "last": only those of the last assistant message; "all": every token but BOS.
    """
    if train_on not in ("assistant", "all", "last"):
        raise ValueError(f"train_on must be 'assistant', 'all' or 'last', got {train_on!r}")
    if not conversation:
        raise ValueError("cannot render an empty conversation")
    last_assistant = max((i for i, m in enumerate(conversation) if m.role == "assistant"), default=-1)
    end_id = _special(tok, END)
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    for i, message in enumerate(conversation):
        if message.role not in ROLE_TOKENS:
            raise ValueError(f"message {i} has unknown role {message.role!r}; expected one of {list(ROLE_TOKENS)}")
        body = tok.encode(message.content) + [end_id]
        if i == len(conversation) - 1 and message.role == "assistant":
            body.append(tok.eos_id)
        trained = (
            train_on == "all"
            or (train_on == "assistant" and message.role == "assistant")
            or (train_on == "last" and i == last_assistant)
        )
        role_id = _special(tok, ROLE_TOKENS[message.role])
        ids += [role_id, *body]
        # The role token is a target only under "all": the model is told who speaks, it does not predict it.
        labels += [role_id if train_on == "all" else IGNORE_INDEX, *(body if trained else [IGNORE_INDEX] * len(body))]
    return ids, labels


def prompt_ids(tok: Tokenizer, conversation: Conversation) -> list[int]:
    """The ids that prompt generation of the next assistant message: the conversation so far + `<|assistant|>`."""
    ids = [tok.bos_id]
    for message in conversation:
        ids += [_special(tok, ROLE_TOKENS[message.role]), *tok.encode(message.content), _special(tok, END)]
    return ids + [_special(tok, ROLE_TOKENS["assistant"])]


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
