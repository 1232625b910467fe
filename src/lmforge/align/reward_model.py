"""The reward model: an lmforge Transformer backbone and a scalar head, its artifact folder, and the scoring API
that PPO, GRPO, best-of-n and the AI judges call.

    rm = RewardModel.from_checkpoint(sft_checkpoint)        # backbone weights + a fresh head
    scores = rm(ids, lengths)                               # [B] fp32, right-padded ids
    rm.save(out_dir, tokenizer_dir=sft_checkpoint)          # atomic; load_reward_model(out_dir)
    result = score_pairs(rm, tok, pairs)                    # chosen / rejected scores, rendered as in training
    pairwise_accuracy(result.chosen, result.rejected)       # with a Wilson 95% interval

Pooling is the last real token's hidden state: in a causal model it is the only position that has seen the whole
prompt and reply (every earlier one is blind to what follows it), and right padding after it cannot reach it, so
a sequence's score does not depend on its batch. Sequences are rendered exactly as `render_pair` renders them for
training (the chat template, the reply ending with its end of turn), so the scored token is the end of turn.

The artifact folder is a complete model checkpoint (lmforge.model.io: model.safetensors, model.json, the
tokenizer files; `load_model` and `load_checkpoint_tokenizer` read it) plus the head:
    reward_head.safetensors   "weight" [1, d_model], "bias" [1]
    reward_model.json         {"format", "pooling", "d_model", "base_checkpoint"}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import Tensor, nn

from lmforge.align.preferences import PreferencePair, render_pair
from lmforge.finetune.classify import pool, right_pad
from lmforge.finetune.data import BadRecord, Conversation, Skipped
from lmforge.finetune.template import render
from lmforge.io import staged_dir
from lmforge.model.io import TOKENIZER, load_model, require_checkpoint, write_model_files
from lmforge.model.modes import evaluating
from lmforge.model.transformer import Transformer
from lmforge.stats import proportion
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
POOLING = "last"
HEAD_WEIGHTS = "reward_head.safetensors"
META = "reward_model.json"


class RewardModel(nn.Module):
    """A Transformer backbone whose last real token's final hidden state a Linear(d_model, 1) maps to a score."""

    def __init__(self, backbone: Transformer, base_checkpoint: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.args.d_model, 1)
        # A small random start (std 1/sqrt(d_model + 1), as TRL's value heads) rather than zeros: a zero head scores
        # every reply 0 and the backbone gets no gradient until the head has moved.
        nn.init.normal_(self.head.weight, std=(backbone.args.d_model + 1) ** -0.5)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).device)
        self.base_checkpoint = base_checkpoint

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | str, device: str = "cpu") -> RewardModel:
        """A reward model on the fp32 weights of `checkpoint` (normally the SFT model) with a fresh head; seed torch
        first for a reproducible head."""
        path = require_checkpoint(checkpoint)
        backbone, _ = load_model(path, device, dtype=torch.float32)
        return cls(backbone, str(path.resolve()))

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Right-padded ids [B, T] and each row's real length [B] -> fp32 scores [B]."""
        hidden = self.backbone(ids, return_hidden=True)
        return self.head(pool(hidden, lengths.to(ids.device), POOLING).float()).squeeze(-1)

    def save(self, directory: Path | str, tokenizer_dir: Path | str) -> Path:
        """Write the artifact folder atomically (replacing an older one), the tokenizer files copied from
        `tokenizer_dir` (the checkpoint the backbone came from)."""
        directory, tokenizer_path = Path(directory), Path(tokenizer_dir) / TOKENIZER
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{tokenizer_dir} has no {TOKENIZER}: pass the checkpoint the backbone came from")
        meta = {"format": FORMAT, "pooling": POOLING, "d_model": self.backbone.args.d_model,
                "base_checkpoint": self.base_checkpoint}  # fmt: skip
        with staged_dir(directory) as tmp:
            write_model_files(self.backbone, self.backbone.args, tmp, tokenizer_path)
            st_save_model(self.head, str(tmp / HEAD_WEIGHTS), metadata={"format": "pt"})
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        log.info("saved reward model to %s", directory)
        return directory


def load_reward_model(directory: Path | str, device: str = "cpu") -> RewardModel:
    """The reward model saved in `directory` by `RewardModel.save`, in eval mode (its tokenizer:
    `lmforge.model.io.load_checkpoint_tokenizer(directory)`)."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a reward model folder: missing {META}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("pooling") != POOLING:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, pooling {meta.get('pooling')!r}; this "
                         f"lmforge reads format {FORMAT}, pooling {POOLING!r}")  # fmt: skip
    backbone, _ = load_model(directory, device)
    rm = RewardModel(backbone, meta.get("base_checkpoint", ""))
    st_load_model(rm.head, str(directory / HEAD_WEIGHTS), strict=True, device=str(device))
    return rm.eval()


@torch.no_grad()
def score_ids(rm: RewardModel, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> Tensor:
    """Scores [len(seqs)] (fp32, CPU) of token id sequences, in eval mode; sequences of similar length share a
    batch, so little padding is computed (and padding never changes a score)."""
    out = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = rm.head.weight.device
    with evaluating(rm):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch, lengths = right_pad([seqs[i] for i in chunk], pad_id)
            out[chunk] = rm(batch.to(device), lengths).cpu()
    return out


@dataclass
class PairScores:
    """Scores of the pairs that could be rendered (`index`: their positions in the input), the number of reply
    tokens each side was scored with (for the length baseline), and the pairs skipped with why."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    index: list[int]
    skipped: Skipped = field(default_factory=Skipped)


def score_pairs(rm: RewardModel, tok: Tokenizer, pairs: Sequence[PreferencePair], batch_size: int = 16,
                max_len: int | None = None, max_prompt_len: int | None = None) -> PairScores:  # fmt: skip
    """Score both sides of each pair, rendered by `render_pair` as in training (`max_len` defaults to the model's
    max_seq_len). A pair that cannot be rendered is skipped and counted at its source."""
    max_len = max_len or rm.backbone.args.max_seq_len
    skipped, rendered, index = Skipped(), [], []
    for i, pair in enumerate(pairs):
        try:
            rendered.append(render_pair(tok, pair, max_len, max_prompt_len))
            index.append(i)
        except BadRecord as e:
            skipped.add(pair.source or f"pair[{i}]", str(e))
    scores = score_ids(rm, [r.chosen_ids for r in rendered] + [r.rejected_ids for r in rendered], tok.pad_id,
                       batch_size)  # fmt: skip
    n = len(rendered)
    chosen_tokens = torch.tensor([len(r.chosen_ids) - r.prompt_len for r in rendered])
    rejected_tokens = torch.tensor([len(r.rejected_ids) - r.prompt_len for r in rendered])
    return PairScores(scores[:n], scores[n:], chosen_tokens, rejected_tokens, index, skipped)


def score_conversations(rm: RewardModel, tok: Tokenizer, conversations: Sequence[Conversation], batch_size: int = 16,
                        max_len: int | None = None) -> tuple[Tensor, list[int], Skipped]:  # fmt: skip
    """Scores of conversations that end with the assistant reply to judge (a rollout, a best-of-n candidate), the
    positions of those scored, and those skipped with why. Rendered with the chat template and cut to `max_len`
    (the model's max_seq_len by default) as `render_pair` cuts a side, so a reply scores as it would in a pair."""
    max_len = max_len or rm.backbone.args.max_seq_len
    skipped, seqs, index = Skipped(), [], []
    for i, conversation in enumerate(conversations):
        ids, labels = render(tok, conversation, "last")
        reply_start = next((j for j, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if reply_start is None:
            skipped.add(f"conversation[{i}]", "no reply: the conversation renders to no assistant reply token")
        elif reply_start >= max_len:
            skipped.add(f"conversation[{i}]", f"prompt too long: {reply_start} prompt tokens leave no room for a "
                                              f"reply in max_len {max_len}")  # fmt: skip
        else:
            seqs.append(ids[:max_len])  # render_pair's cut: the whole prompt and the reply's head
            index.append(i)
    return score_ids(rm, seqs, tok.pad_id, batch_size), index, skipped


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> dict[str, Any]:
    """The fraction of pairs whose chosen score is higher, a tie counting half (a model that cannot tell the sides
    apart scores 0.5, not 0), with its Wilson 95% interval (lmforge.stats.proportion)."""
    chosen, rejected = chosen_scores.double(), rejected_scores.double()
    correct = float((chosen > rejected).sum()) + 0.5 * float((chosen == rejected).sum())
    return proportion(correct, len(chosen))


def longer_answer_baseline(chosen_tokens: Tensor, rejected_tokens: Tensor) -> dict[str, Any]:
    """The accuracy of always preferring the longer reply on the same pairs (equal lengths count half), with its
    Wilson 95% interval: a reward model must beat it to show it learned more than length."""
    return pairwise_accuracy(chosen_tokens, rejected_tokens)
