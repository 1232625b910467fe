"""The loss contract of the training loop, and the one cross-entropy every loss and every scorer uses.

Label convention: labels are aligned with the logits. `logits[..., t, :]` is scored against `labels[..., t]`, so a
causal batch carries its targets already shifted (`labels[:, t]` is `input_ids[:, t + 1]`), and IGNORE_INDEX marks
a position no loss counts. `shift_labels` turns per-token labels aligned with the inputs (a chat template's loss
mask) into this convention.

A loss is `loss_fn(model, batch, ctx=None) -> (loss, metrics)`:

- `loss` is this micro-batch's share of the optimizer step's loss: the sum of its per-token (or per-pair, per-row)
  losses divided by `ctx.tokens`, the loss tokens of the whole step (all micro-batches, all data-parallel ranks),
  which the loop counts before the step and passes in. The step's loss is the sum of these shares, so N ranks
  compute exactly what one process computes, however unevenly the tokens fall.
- `metrics` maps names to scalar tensors or floats; the loop averages each over the step's `ctx.parts`
  (micro-batches x data-parallel ranks). `ctx.mean(total)` scales a sum over this micro-batch's loss tokens so that
  the average is the whole step's mean per loss token.
- `ctx.frozen` holds the frozen models the loss reads (a reference model, a teacher), on the device, in eval mode.

Called without a context (evaluation, tests), a loss is the plain mean over its own batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.tokenizer import IGNORE_INDEX

Metrics = dict[str, Tensor | float]
LossResult = tuple[Tensor, Metrics]


def cross_entropy(logits: Tensor, labels: Tensor, reduction: Literal["sum", "none"] = "sum") -> Tensor:
    """Cross-entropy in nats of `logits` [..., V] against `labels` [...] aligned with them, in fp32 whatever the
    logits' dtype; positions labelled IGNORE_INDEX count 0. "sum": one scalar; "none": one value per position."""
    per = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction=reduction)  # fmt: skip
    return per if reduction == "sum" else per.view(labels.shape)


def label_count(labels: Tensor) -> Tensor:
    """The positions a loss counts: labels that are not IGNORE_INDEX."""
    return (labels != IGNORE_INDEX).sum()


def shift_labels(labels: Tensor) -> Tensor:
    """Labels aligned with the inputs [B, T] (token t is trained or not) -> aligned with the logits: position t is
    scored against token t + 1, and the last position, with no next token, against nothing."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


@dataclass(frozen=True)
class LossContext:
    """What the loop tells a loss about the step it is part of."""

    tokens: Tensor | int  # loss tokens of the whole step: all micro-batches, all data-parallel ranks (at least 1)
    parts: int = 1  # micro-batches x data-parallel ranks: what the loop averages metrics over
    frozen: Mapping[str, nn.Module] = field(default_factory=dict)  # frozen models: reference, teacher

    @classmethod
    def local(cls, count: Tensor | int) -> LossContext:
        """A batch on its own: its loss is its mean (0, not NaN, when it has no loss token)."""
        return cls(tokens=count.clamp(min=1) if isinstance(count, Tensor) else max(int(count), 1))

    def share(self, total: Tensor) -> Tensor:
        """This micro-batch's part of the step's mean loss, from its loss summed over its own tokens."""
        return total / self.tokens

    def mean(self, total: Tensor) -> Tensor:
        """A metric summed over this micro-batch's loss tokens, scaled so that the loop's average over the step's
        parts is the step's mean per loss token (a token accuracy, say)."""
        return total * self.parts / self.tokens

    def per_micro_batch(self, count: Tensor | int) -> LossContext:
        """A context in which this micro-batch's mean weighs as much as every other micro-batch's: for a mixture of
        objectives whose loss tokens are not comparable (masked tokens, next tokens, pairs)."""
        count = count.clamp(min=1) if isinstance(count, Tensor) else max(int(count), 1)
        return replace(self, tokens=count * self.parts)


def ce_loss(logits: Tensor, labels: Tensor, ctx: LossContext | None = None) -> LossResult:
    """The loss of labelled positions (causal LM, masked LM, prefix LM, SFT): their summed cross-entropy as this
    micro-batch's share of the step (the mean over the batch without `ctx`)."""
    ctx = ctx or LossContext.local(label_count(labels))
    return ctx.share(cross_entropy(logits, labels)), {}


LossFn = Callable[[nn.Module, Any, LossContext], LossResult]


@runtime_checkable
class LogitsLoss(Protocol):
    """A causal loss that can also be computed from the logits alone, which is all the last stage of a pipeline
    holds: `split(batch)` gives (input_ids, labels), `from_logits(logits, labels, ctx)` the loss and metrics.
    Calling it on a model must compute `from_logits(model(input_ids), labels, ctx)`, so a pipelined run and a
    single process train on the same function."""

    def __call__(self, model: nn.Module, batch: Any, ctx: LossContext | None = None) -> LossResult: ...

    def split(self, batch: Any) -> tuple[Tensor, Tensor]: ...

    def from_logits(self, logits: Tensor, labels: Tensor, ctx: LossContext | None = None) -> LossResult: ...
