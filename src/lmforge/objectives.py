"""Objectives: a model and a batch in, `(loss, metrics)` out (the contract of lmforge.losses: the loss is the batch's
share of the training step, its mean when called without a context). Labels are aligned with the logits;
targets equal to IGNORE_INDEX do not count.

Every objective trains the one decoder backbone; they differ in the attention mask they ask for and in the batch
a builder makes from the loader's token windows. Builders are pure functions of the tokens and a
`torch.Generator` (on the tokens' device), so a seeded run draws the same noise every time. Batches are dicts:

    clm          (x [B,T], y [B,T])                                     attn="causal"
    mlm          {"input_ids" [B,T], "labels" [B,T]}                    attn="bidirectional"
    span         {"input_ids" [B,T], "labels" [B,T], "prefix_len" [B]}  attn="prefix"
    prefix_lm    {"input_ids" [B,T], "labels" [B,T], "prefix_len" [B]}  attn="prefix"
    contrastive  {"input_ids" [2B,T'], "mask" [2B,T']}                  attn="bidirectional"; rows i and B+i
                                                                        are two views of text i, mask marks tokens

`span` and `prefix_lm` both run the backbone as a prefix LM (UL2): the prefix attends both ways, the rest causally,
and only tokens after the prefix are predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field, model_validator

from lmforge.data.batches import count_labels
from lmforge.losses import LossContext, LossResult, ce_loss, cross_entropy
from lmforge.settings import Section
from lmforge.tokenizer import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

# The pretrain stage's settings (the `pretrain` section of a recipe).
OBJECTIVES = ("clm", "mlm", "span", "prefix_lm", "contrastive")


class PretrainConfig(Section):
    # One objective, or a mixture {name: weight}: each optimizer step draws its objective with these weights.
    objective: Literal["clm", "mlm", "span", "prefix_lm", "contrastive"] | dict[str, float] = "clm"
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)  # BERT: share of tokens selected for prediction
    mlm_mask_fraction: float = Field(0.8, ge=0.0, le=1.0)  # of those, replaced by <|mask|>
    mlm_random_fraction: float = Field(0.1, ge=0.0, le=1.0)  # of those, replaced by a random token
    span_density: float = Field(0.15, gt=0.0, lt=1.0)  # T5: share of tokens inside corrupted spans
    span_mean_length: float = Field(3.0, ge=1.0)
    prefix_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # prefix_lm: mean share of a row that is the prefix
    contrastive_temperature: float = Field(0.05, gt=0.0)
    # "window": fixed windows cut from the token stream. "best_fit": whole documents packed into rows that each
    # start at a BOS, by best fit; with document_masking, tokens attend only within their own document.
    packing: Literal["window", "best_fit"] = "window"
    document_masking: bool = False

    @model_validator(mode="after")
    def _check_objective(self) -> "PretrainConfig":
        if isinstance(self.objective, dict):
            unknown = sorted(set(self.objective) - set(OBJECTIVES))
            if unknown or not self.objective:
                raise ValueError(f"objective mixture {self.objective}: names must be among {list(OBJECTIVES)}")
            if any(w <= 0 for w in self.objective.values()):
                raise ValueError(f"objective mixture {self.objective}: every weight must be positive")
        if self.mlm_mask_fraction + self.mlm_random_fraction > 1.0:
            raise ValueError("mlm_mask_fraction + mlm_random_fraction must not exceed 1")
        return self


# Contrastive views (see `contrastive_views`): each view keeps a random 30-70% crop of the row, then drops 10% of
# its tokens. The backbone has no dropout, so SimCSE's "same text twice through dropout" gives identical views.
CROP_RANGE = (0.3, 0.7)
TOKEN_DELETION = 0.1


def clm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...], ctx: LossContext | None = None) -> LossResult:
    """Causal LM loss over `(x, y)` windows, or packed rows `(x, y, doc_ids)` whose attention stops at document
    boundaries (doc_ids None: plain causal attention); fp32 cross-entropy whatever the model's dtype."""
    x, y, *rest = batch
    doc_ids = rest[0] if rest else None
    logits = model(x) if doc_ids is None else model(x, doc_ids=doc_ids)
    return ce_loss(logits, y, ctx)


def token_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, [B, T], 0 where y is IGNORE_INDEX."""
    return cross_entropy(model(x), y, reduction="none")


# ---------------------------------------------------------------------------------------------------- MLM (BERT)


def mlm_batch(
    tokens: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    probability: float,
    mask_fraction: float,
    random_fraction: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """BERT masking of `tokens` [B, T]: each non-special token is selected with `probability`; a selected token
    becomes `mask_id` (share `mask_fraction`), a random non-special token (`random_fraction`) or stays as it is
    (the rest). Labels hold the original token at selected positions, IGNORE_INDEX elsewhere."""
    dev = tokens.device
    special = torch.zeros(vocab_size, dtype=torch.bool, device=dev)
    special[torch.as_tensor(list(special_ids), dtype=torch.long, device=dev)] = True
    selected = (torch.rand(tokens.shape, generator=generator, device=dev) < probability) & ~special[tokens]
    action = torch.rand(tokens.shape, generator=generator, device=dev)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    allowed = (~special).nonzero().squeeze(1)
    random_ids = allowed[torch.randint(len(allowed), tokens.shape, generator=generator, device=dev)]
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(to_random, random_ids, inputs)
    return {"input_ids": inputs, "labels": torch.where(selected, tokens, IGNORE_INDEX)}


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext | None = None) -> LossResult:
    """Masked-LM loss: cross entropy over the selected tokens, attention in both directions."""
    return ce_loss(model(batch["input_ids"], attn="bidirectional"), batch["labels"], ctx)


@torch.no_grad()
def mlm_accuracy(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Share of selected tokens whose original the model ranks first (0.0 when none is selected)."""
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    predicted = model(batch["input_ids"], attn="bidirectional").argmax(-1)
    return float((predicted[selected] == labels[selected]).float().mean()) if selected.any() else 0.0


# ------------------------------------------------------------------------------------------- span corruption (T5)


def span_counts(length: int, density: float, mean_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a row of `length` >= 2 tokens, as T5 counts them: round(length * density)
    noise tokens in round(noise / mean_length) spans, at least one of each and one kept token per span."""
    n_noise = min(max(round(length * density), 1), length - 1)
    n_spans = max(1, min(round(n_noise / mean_length), n_noise, length - n_noise))
    return n_noise, n_spans


def _random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths of `n_segments` parts, each >= 1, summing to `n_items`; every such split equally likely."""
    cuts = torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([n_items])])
    return bounds.diff()


def noise_mask(length: int, *, density: float, mean_length: float, generator: torch.Generator) -> torch.Tensor:
    """Bool [length]: T5's random_spans_noise_mask. Noise and kept tokens form alternating runs with random lengths.

    T5 always starts with kept tokens and so always ends on a span; a coin decides which comes first here, so the
    last input token is not always a sentinel, and the span count stays exactly `span_counts`.
    """
    if length < 2:
        raise ValueError(f"span corruption needs rows of at least 2 tokens, got {length}")
    n_noise, n_spans = span_counts(length, density, mean_length)
    noise = _random_segmentation(n_noise, n_spans, generator)
    kept = _random_segmentation(length - n_noise, n_spans, generator)
    noise_first = bool(torch.randint(2, (1,), generator=generator))
    runs = torch.stack([noise, kept] if noise_first else [kept, noise], dim=1).flatten()
    flags = torch.tensor([noise_first, not noise_first]).repeat(n_spans)
    return torch.repeat_interleave(flags, runs)


def span_corruption(
    tokens: torch.Tensor, *, density: float, mean_length: float, sentinel_ids: Sequence[int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """T5 span corruption of a 1-D row: inputs have span i replaced by sentinel i; targets are, span after span,
    sentinel i followed by the tokens of span i. `reconstruct(inputs, targets, sentinel_ids)` gives `tokens` back."""
    tokens = tokens.cpu()
    mask = noise_mask(len(tokens), density=density, mean_length=mean_length, generator=generator)
    starts = mask & ~torch.cat([torch.zeros(1, dtype=torch.bool), mask[:-1]])
    n_spans = int(starts.sum())
    if n_spans > len(sentinel_ids):
        raise ValueError(
            f"{n_spans} noise spans need more than the {len(sentinel_ids)} sentinel tokens; "
            "lower pretrain.span_density, raise pretrain.span_mean_length or use shorter rows"
        )
    sentinel_of = torch.as_tensor(list(sentinel_ids[:n_spans]), dtype=torch.long)[(starts.cumsum(0) - 1).clamp(min=0)]
    positions = torch.arange(len(tokens))

    def emit(counts: torch.Tensor) -> torch.Tensor:
        # A span start emitted twice gives its sentinel first, then (in targets) its token.
        idx = torch.repeat_interleave(positions, counts)
        first = torch.ones_like(idx, dtype=torch.bool)
        first[1:] = idx[1:] != idx[:-1]
        return torch.where(first & starts[idx], sentinel_of[idx], tokens[idx])

    inputs = emit((~mask).long() + starts.long())
    targets = emit(mask.long() + starts.long())
    return inputs, targets


def reconstruct(inputs: torch.Tensor, targets: torch.Tensor, sentinel_ids: Sequence[int]) -> torch.Tensor:
    """The row `span_corruption` was given: each sentinel in `inputs` replaced by its span from `targets`."""
    sentinels = set(sentinel_ids)
    spans: dict[int, list[int]] = {}
    current: list[int] = []
    for t in targets.tolist():
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out: list[int] = []
    for t in inputs.tolist():
        out.extend(spans.get(t, []) if t in sentinels else [t])
    return torch.tensor(out, dtype=inputs.dtype)


@lru_cache(maxsize=64)
def span_source_length(row_len: int, density: float, mean_length: float, n_sentinels: int) -> int:
    """The most source tokens whose corruption, inputs and targets together (source + 2 * spans tokens), fits
    `row_len` and needs no more than `n_sentinels` spans."""
    for length in range(row_len, 1, -1):
        _, n_spans = span_counts(length, density, mean_length)
        if length + 2 * n_spans <= row_len and n_spans <= n_sentinels:
            return length
    raise ValueError(f"rows of {row_len} tokens are too short for span corruption")


def span_batch(
    tokens: torch.Tensor, *, density: float, mean_length: float, sentinel_ids: Sequence[int], pad_id: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Span corruption for the decoder-only backbone, the UL2 way, from windows `tokens` [B, T+1].

    Each row corrupts its first `span_source_length` tokens, lays out [inputs ; targets], and is padded to T+1
    with PAD; the model reads the first T tokens with `prefix_len` = len(inputs) and predicts the targets only.
    """
    B, n = tokens.shape
    length = span_source_length(n, density, mean_length, len(sentinel_ids))
    x = torch.full((B, n - 1), pad_id, dtype=torch.long)
    y = torch.full((B, n - 1), IGNORE_INDEX, dtype=torch.long)
    prefix_len = torch.empty(B, dtype=torch.long)
    for b in range(B):
        inputs, targets = span_corruption(tokens[b, :length], density=density, mean_length=mean_length,
                                          sentinel_ids=sentinel_ids, generator=generator)  # fmt: skip
        seq = torch.cat([inputs, targets])
        x[b, : len(seq) - 1] = seq[:-1]
        y[b, len(inputs) - 1 : len(seq) - 1] = targets
        prefix_len[b] = len(inputs)
    dev = tokens.device
    return {"input_ids": x.to(dev), "labels": y.to(dev), "prefix_len": prefix_len.to(dev)}


# ------------------------------------------------------------------------------------------------------ prefix LM


def prefix_lm_batch(
    tokens: torch.Tensor, *, prefix_fraction: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Prefix LM from windows `tokens` [B, T+1]: row b's first prefix_len[b] tokens are context, read both ways;
    only the tokens after them are predicted. The prefix share is uniform on an interval centred on
    `prefix_fraction` (so that is its mean), and every row keeps at least one prefix and one target token."""
    B, n = tokens.shape
    T = n - 1
    if T < 2:
        raise ValueError(f"prefix LM needs rows of at least 3 tokens, got {n}")
    lo, hi = max(0.0, 2 * prefix_fraction - 1), min(1.0, 2 * prefix_fraction)
    share = lo + (hi - lo) * torch.rand(B, generator=generator, device=tokens.device)
    prefix_len = (share * T).round().long().clamp(1, T - 1)
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    # Position p predicts token p + 1, so predictions start at the prefix's last token.
    y[torch.arange(T, device=tokens.device)[None, :] < prefix_len[:, None] - 1] = IGNORE_INDEX
    return {"input_ids": x, "labels": y, "prefix_len": prefix_len}


def prefix_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext | None = None) -> LossResult:
    """Prefix-LM loss (prefix_lm and span batches): cross entropy over the tokens after the prefix."""
    logits = model(batch["input_ids"], attn="prefix", prefix_len=batch["prefix_len"])
    return ce_loss(logits, batch["labels"], ctx)


span_loss = prefix_lm_loss  # the span batch carries its own prefix; the loss is the same


# --------------------------------------------------------------------------------------------- contrastive (SimCSE)


def pooled_embeddings(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the final hidden states over the tokens `mask` marks, [N, d] in fp32.

    Padding gets its own document id, so with bidirectional attention no token attends to padding and a text's
    embedding does not depend on how much padding its batch needed.
    """
    hidden = model(input_ids, attn="bidirectional", doc_ids=(~mask).long(), return_hidden=True).float()
    weights = mask.unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


def contrastive_views(tokens: torch.Tensor, *, pad_id: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two augmented views of each row of `tokens` [B, T], stacked as rows i and B+i, right-padded with PAD.

    SimCSE feeds the same text twice and lets dropout tell the two apart; this backbone has no dropout, so each
    view is instead an independent random crop (CROP_RANGE of the row) with TOKEN_DELETION of its tokens dropped,
    as in Contriever. Both views of a row come from the same stretch of text; other rows are the negatives.
    """
    B, T = tokens.shape
    dev = tokens.device
    rows = tokens.repeat(2, 1)
    lo, hi = CROP_RANGE
    lengths = (T * (lo + (hi - lo) * torch.rand(2 * B, generator=generator, device=dev))).long().clamp(1, T)
    starts = (torch.rand(2 * B, generator=generator, device=dev) * (T - lengths + 1)).long()
    width = int(lengths.max())
    pos = torch.arange(width, device=dev)[None, :]
    keep = (pos < lengths[:, None]) & (torch.rand(2 * B, width, generator=generator, device=dev) >= TOKEN_DELETION)
    keep[:, 0] = True  # a view is never empty
    crops = rows.gather(1, (starts[:, None] + pos).clamp(max=T - 1))
    order = torch.argsort((~keep).long(), dim=1, stable=True)  # kept tokens first, in their order
    mask = pos < keep.sum(1, keepdim=True)
    input_ids = torch.where(mask, crops.gather(1, order), pad_id)
    n = int(mask.sum(1).max())
    return {"input_ids": input_ids[:, :n].contiguous(), "mask": mask[:, :n].contiguous()}


def contrastive_pairs(batch: dict[str, torch.Tensor]) -> int:
    """The loss tokens of a contrastive batch: its pairs of views (rows i and B+i)."""
    return batch["input_ids"].shape[0] // 2


def contrastive_loss(model: nn.Module, batch: dict[str, torch.Tensor], ctx: LossContext | None = None,
                     temperature: float = 0.05) -> LossResult:  # fmt: skip
    """In-batch-negatives InfoNCE: view a of text i must pick view b of text i among the batch's b views, by
    cosine similarity / temperature; its mean over pairs equals log(B) when all embeddings coincide. Metric
    `pair_accuracy`: the share of pairs whose own view b scores highest."""
    a, b = pooled_embeddings(model, batch["input_ids"], batch["mask"]).chunk(2)
    logits = a @ b.T / temperature
    own = torch.arange(len(a), device=logits.device)
    ctx = ctx or LossContext.local(len(a))
    hits = (logits.detach().argmax(-1) == own).sum()
    return ctx.share(cross_entropy(logits, own)), {"pair_accuracy": ctx.mean(hits)}


# ---------------------------------------------------------------------------------------------- by objective name

LOSSES: dict[str, Callable[..., LossResult]] = {
    "clm": clm_loss,
    "mlm": mlm_loss,
    "span": span_loss,
    "prefix_lm": prefix_lm_loss,
    "contrastive": contrastive_loss,
}


def objective_loss(objective: str, cfg: PretrainConfig) -> Callable[..., LossResult]:
    """`loss_fn(model, batch, ctx=None)` for an objective name, with the settings it takes from `cfg` bound."""
    if objective not in LOSSES:
        raise ValueError(f"pretrain.objective {objective!r}: allowed values are {list(LOSSES)}")
    if objective == "contrastive":
        return partial(contrastive_loss, temperature=cfg.contrastive_temperature)
    return LOSSES[objective]


def objective_loss_tokens(objective: str, batch: Any) -> int:
    """The loss tokens of one of `objective`'s batches: its pairs (contrastive) or its labelled targets."""
    return contrastive_pairs(batch) if objective == "contrastive" else count_labels(batch)


def objective_batch(
    objective: str, x: torch.Tensor, y: torch.Tensor, cfg: PretrainConfig, tokenizer: Tokenizer,
    generator: torch.Generator,
) -> Any:  # fmt: skip
    """The batch `objective_loss(objective, cfg)` takes, built from one loader batch `(x, y)` (y = x shifted by one)."""
    if objective == "clm":
        return x, y
    if objective == "mlm":
        return mlm_batch(x, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                         special_ids=tokenizer.special_ids, probability=cfg.mlm_probability,
                         mask_fraction=cfg.mlm_mask_fraction, random_fraction=cfg.mlm_random_fraction,
                         generator=generator)  # fmt: skip
    if objective == "contrastive":
        return contrastive_views(x, pad_id=tokenizer.pad_id, generator=generator)
    window = torch.cat([x, y[:, -1:]], dim=1)  # the loader's T+1 tokens
    if objective == "span":
        return span_batch(window, density=cfg.span_density, mean_length=cfg.span_mean_length,
                          sentinel_ids=tokenizer.sentinel_ids, pad_id=tokenizer.pad_id,
                          generator=generator)  # fmt: skip
    if objective == "prefix_lm":
        return prefix_lm_batch(window, prefix_fraction=cfg.prefix_fraction, generator=generator)
    raise ValueError(f"pretrain.objective {objective!r}: allowed values are {list(LOSSES)}")
