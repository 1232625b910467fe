"""Rollouts for the on-policy methods (GRPO, PPO): sample replies from the live policy and score their tokens.

A rollout is G replies to each of its prompts, sampled at one temperature (no top-k, no top-p), so the log-probs
`token_logps` computes from `log_softmax(logits / temperature)` are exactly those of the distribution the sampler
drew from: the ratio a clipped loss takes and the KL it estimates are then unbiased.

Each prompt's group is drawn with its own generator, seeded by `prompt_seed(seed, global prompt index)`: the same
prompt gets the same replies whatever other prompts share the call, so a run split over ranks samples what one
process samples, and a resumed run what an uninterrupted one does (the caller folds its rollout number into
`seed`). A reply that ended its turn keeps its stop token in `ids` and `labels`, so the loss also trains the end
of the turn; a reply cut at `max_new_tokens` has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.align.pair_batches import pad_rows
from lmforge.infer.engine import generate
from lmforge.model.modes import evaluating
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer


@dataclass
class Rollout:
    """G replies per prompt, row `i * G + g` being reply g to prompt i."""

    ids: Tensor  # [N, T] right-padded with the tokenizer's pad id: prompt + reply (+ the stop token when it ended)
    labels: Tensor  # [N, T] aligned with the logits: the reply's tokens and its stop token; IGNORE_INDEX elsewhere
    prompt_index: list[int]  # row -> index into the prompts given
    replies: list[list[int]]  # without the stop token
    ended: list[bool]  # the reply ended its turn within max_new_tokens
    texts: list[str]  # the decoded replies (special tokens skipped)


def prompt_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (a run's seed, a rollout number, a prompt's index)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def reply_labels(prompt_len: int, full_len: int, ids: Sequence[int]) -> list[int]:
    """Labels aligned with the logits for one row of `full_len` tokens: position t scores token t + 1, which is
    trained when it belongs to the reply (t + 1 >= prompt_len)."""
    labels = [IGNORE_INDEX] * full_len
    for t in range(prompt_len - 1, full_len - 1):
        labels[t] = ids[t + 1]
    return labels


@torch.no_grad()
def sample_rollout(model: nn.Module, tok: Tokenizer, prompts: Sequence[list[int]], prompt_index: Sequence[int],
                   group_size: int, max_new_tokens: int, temperature: float, seed: int) -> Rollout:  # fmt: skip
    """`group_size` replies to each prompt (token ids, the chat template's prompt) at `temperature` > 0; the group
    of prompt i is drawn with `prompt_seed(seed, prompt_index[i])`, prompt_index being each prompt's global index."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: rollouts sample, so it must be > 0 (1.0 samples the model as is)")
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: expected at least 1 reply per prompt")
    if len(prompts) != len(prompt_index):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_index)} prompt indices")
    stops = frozenset(tok.stop_ids)
    rows, labels, replies, ended, index = [], [], [], [], []
    with evaluating(model):
        for i, (prompt, global_index) in enumerate(zip(prompts, prompt_index)):
            outs = generate(model, [list(prompt)] * group_size, max_new_tokens, temperature=temperature,
                            stop_ids=tok.stop_ids, seed=prompt_seed(seed, global_index), include_stop=True)  # fmt: skip
            for out in outs:
                stopped = bool(out) and out[-1] in stops
                full = list(prompt) + out
                rows.append(full)
                labels.append(reply_labels(len(prompt), len(full), full))
                replies.append(out[:-1] if stopped else out)
                ended.append(stopped)
                index.append(i)
    texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
    return Rollout(ids=pad_rows(rows, tok.pad_id), labels=pad_rows(labels, IGNORE_INDEX), prompt_index=index,
                   replies=replies, ended=ended, texts=texts)  # fmt: skip


def logits_token_stats(logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log-probs, entropies) [N, T] in fp32 of the labelled tokens under `log_softmax(logits / temperature)`, both
    0 where labels are IGNORE_INDEX; the entropies carry no gradient."""
    logits = logits.float()
    # Each full-vocabulary tensor here is rows x positions x vocabulary floats: make as few as the gradient needs.
    logp_all = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    mask = labels != IGNORE_INDEX
    logps = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a measure, never a loss term: no graph, no saved tensors
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps * mask, entropy * mask


def token_logps(model: nn.Module, ids: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """[N, T] fp32 log-probs of the labelled tokens under `log_softmax(model(ids) / temperature)` (the sampling
    distribution), 0 where labels == IGNORE_INDEX. Gradients flow unless the caller disables them."""
    return logits_token_stats(model(ids), labels, temperature)[0]
