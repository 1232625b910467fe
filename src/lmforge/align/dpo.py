"""The DPO family on the one training loop: DPO (sigmoid), robust DPO, IPO, SimPO and KTO, full or LoRA.

A batch is `PairBatches`' (chosen rows, then rejected rows, one forward for both). The reference's log-probabilities
come from the cache computed before training (lmforge.align.ref_cache, `reference="cached"`) or from a frozen copy
of the starting model held in memory (`reference="frozen"`, passed to the loop as `frozen={"reference": ref}`).
IPO and SimPO use per-token mean log-probabilities, the others sums (docs/alignment.md, "Losses").

KTO trains on unpaired replies labelled desirable or not. Its reference point z0, the KL between policy and
reference, is estimated as the KTO paper and TRL do, from mismatched prompt/reply pairs: each example is rendered
as a pair whose first side is its own reply and whose second side is another example's reply after the same
prompt (a seeded derangement of the examples, fixed for the run, so the cache can hold it); z0 is the mean
policy-reference log-ratio of the batch's mismatched rows, clamped at 0 and detached.

    out_dir/final/       the tuned model (LoRA: adapters merged), a checkpoint every tool loads
    out_dir/adapter/     LoRA only: the adapter alone
    out_dir/reference/   the reference cache: train/ and heldout/
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.align.losses import dpo_loss, kto_loss, simpo_loss
from lmforge.align.pair_batches import PairBatches, collate_pairs, split_sides
from lmforge.align.preferences import LabelledReply, PreferencePair, RenderedPair, render_pairs
from lmforge.align.ref_cache import ReferenceLogps, pair_logps, reference_logps
from lmforge.finetune.data import Skipped
from lmforge.finetune.sft import ADAPTER_DIR, ADAPTER_NAME, live_checkpoint_writer, write_plain
from lmforge.losses import LossContext, LossResult, Metrics
from lmforge.model.io import TOKENIZER, load_checkpoint_tokenizer, load_model, write_model_files
from lmforge.model.lora import LoRAConfig, apply_lora, save_adapter, trainable_parameters
from lmforge.model.modes import evaluating
from lmforge.outdir import inputs_fingerprint
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed import check_batch, collective_errors, init_world
from lmforge.train.loop import FINAL_DIR, METRICS_FILE, train
from lmforge.train.loop import OUTPUTS as LOOP_OUTPUTS

log = logging.getLogger(__name__)

LossType = Literal["sigmoid", "robust", "ipo", "simpo", "kto"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "ipo", "simpo", "kto")
REF_DIR = "reference"
OUTPUTS = (*LOOP_OUTPUTS, ADAPTER_DIR, REF_DIR)  # what a job writes in its folder
HELDOUT = "heldout/"  # prefix of the held-out metrics in metrics.jsonl
FALLING_ADVICE = ("lower train.lr or beta, or set a positive label_smoothing (conservative DPO), or train SFT on "
                  "the chosen replies first")  # fmt: skip


@dataclass(frozen=True)
class PreferenceLoss:
    """The loop's loss for one member of the DPO family. `reference` is the cache of the pairs the batches index;
    without it the reference is `ctx.frozen["reference"]` (SimPO needs none). Metrics besides the loss's own
    (lmforge.align.losses): `kl`, the policy-reference log-ratio per chosen reply token (0 at the start), and
    `length/chosen`, `length/rejected`, the mean reply lengths in tokens (KTO: `length/chosen` only)."""

    loss_type: LossType = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: ReferenceLogps | None = field(default=None, repr=False)

    def reference_logps(self, batch: dict[str, Tensor], frozen: Any) -> tuple[Tensor, Tensor] | None:
        """The reference's (log-probabilities [2B], token counts [2B]) of the batch's rows, or None for SimPO."""
        if self.loss_type == "simpo":
            return None
        if self.reference is not None:
            return self.reference.take(batch["index"])
        if "reference" not in frozen:
            raise ValueError(f"loss_type={self.loss_type!r} needs a reference: pass the cache (reference=) or a frozen "
                             "model (train(..., frozen={'reference': model}))")  # fmt: skip
        with torch.no_grad():
            return pair_logps(frozen["reference"], batch)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], ctx: LossContext | None = None) -> LossResult:
        logp, tokens = pair_logps(model, batch)
        ref = self.reference_logps(batch, ctx.frozen if ctx else {})
        ctx = ctx or LossContext.local(batch["index"].numel())
        (chosen, rejected), (n_chosen, n_rejected) = split_sides(logp), split_sides(tokens)
        extra: Metrics = {"length/chosen": n_chosen.float().mean()}
        if ref is not None:
            ref_logp = ref[0].to(logp.device)
            ref_chosen, ref_rejected = split_sides(ref_logp)
            extra["kl"] = (chosen - ref_chosen).detach().sum() / n_chosen.sum().clamp(min=1)
        if self.loss_type == "kto":
            z0 = (rejected - ref_rejected).detach().mean()  # the mismatched rows: the KL reference point
            loss, metrics = kto_loss(chosen, ref_chosen, batch["desirable"].to(logp.device), z0, self.beta,
                                     self.desirable_weight, self.undesirable_weight, ctx)  # fmt: skip
            return loss, {**metrics, **extra}
        extra["length/rejected"] = n_rejected.float().mean()
        if self.loss_type in ("ipo", "simpo"):  # per-token means
            chosen, rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        if self.loss_type == "simpo":
            loss, metrics = simpo_loss(chosen, rejected, self.beta, self.gamma, ctx)
            return loss, {**metrics, **extra}
        if self.loss_type == "ipo":
            ref_chosen, ref_rejected = ref_chosen / n_chosen.clamp(min=1), ref_rejected / n_rejected.clamp(min=1)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,  # type: ignore[arg-type]
                                 self.label_smoothing, ctx)  # fmt: skip
        return loss, {**metrics, **extra}


class KTOBatches(PairBatches):
    """PairBatches of KTO examples (own reply, mismatched reply) that also carry `desirable` [B] (bool)."""

    def __init__(self, pairs: Sequence[RenderedPair], desirable: Sequence[bool], batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        super().__init__(pairs, batch_size, pad_id, seed, rank, world_size)
        self.desirable = torch.tensor(list(desirable), dtype=torch.bool)

    def __next__(self) -> dict[str, Tensor]:
        batch = super().__next__()
        return {**batch, "desirable": self.desirable[batch["index"]]}


def unpair(pairs: Sequence[PreferencePair]) -> list[LabelledReply]:
    """Preference pairs as KTO's unpaired data: the chosen reply desirable, the rejected one not."""
    return [LabelledReply(p.prompt, reply, good, p.id, p.source)
            for p in pairs for reply, good in ((p.chosen, True), (p.rejected, False))]  # fmt: skip


def render_kto(tok: Any, records: Sequence[LabelledReply], max_len: int, skipped: Skipped, seed: int,
               max_prompt_len: int | None = None) -> tuple[list[RenderedPair], list[bool]]:  # fmt: skip
    """Each labelled reply as a pair (its own reply, the reply of its partner after the same prompt), partners
    drawn as a seeded derangement (a shifted permutation: no example is its own partner); and the labels."""
    if len(records) < 2:
        raise ValueError(f"KTO needs at least 2 labelled replies (for its mismatched pairs), got {len(records)}")
    order = np.random.default_rng(seed).permutation(len(records))
    partner = np.empty_like(order)
    partner[order] = np.roll(order, -1)
    mismatched = [PreferencePair(r.prompt, r.reply, records[int(j)].reply, r.id, r.source)
                  for r, j in zip(records, partner)]  # fmt: skip
    before = skipped.count
    rendered, kept = [], []
    for record, pair in zip(records, mismatched):
        out = render_pairs(tok, [pair], max_len, skipped, max_prompt_len)
        if out:
            rendered += out
            kept.append(record.desirable)
    if skipped.count > before:
        log.warning("%d of %d KTO examples could not be rendered (counted as skipped)", skipped.count - before,
                    len(records))  # fmt: skip
    return rendered, kept


def heldout_metrics(model: nn.Module, loss: PreferenceLoss, pairs: Sequence[RenderedPair], pad_id: int,
                    batch_size: int, reference: nn.Module | None = None,
                    desirable: Sequence[bool] | None = None) -> dict[str, float]:  # fmt: skip
    """The loss's metrics (and the loss) over every held-out pair, in fixed batches, averaged by batch size.
    `loss.reference` is the held-out cache, or `reference` the frozen model; `desirable`: KTO labels."""
    totals: dict[str, float] = {}
    frozen = {"reference": reference} if reference is not None else {}
    with evaluating(model), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start : start + batch_size], pad_id)
            batch["index"] = torch.arange(start, start + len(batch["lengths"]) // 2)
            if desirable is not None:
                batch["desirable"] = torch.tensor(list(desirable[start : start + batch_size]), dtype=torch.bool)
            value, metrics = loss(model, batch, LossContext(tokens=batch["index"].numel(), frozen=frozen))
            for name, v in {"loss": value, **metrics}.items():
                totals[name] = totals.get(name, 0.0) + float(v) * batch["index"].numel()
    return {name: v / len(pairs) for name, v in totals.items()}


def chosen_reward_falling(history: Sequence[float], k: int) -> bool:
    """True when the chosen reward fell at each of the last `k` evaluations and ended below where it started:
    DPO can raise the margin while pushing both replies down (OpenRLHF#1054), which makes the chosen reply less
    likely than before training."""
    if k < 1 or len(history) <= k:
        return False
    tail = list(history[-k - 1 :])
    return all(b < a for a, b in zip(tail, tail[1:])) and tail[-1] < history[0]


def warn_if_chosen_falls(history: Sequence[float], k: int) -> bool:
    """`chosen_reward_falling`, logged as a warning that says what to try."""
    falling = chosen_reward_falling(history, k)
    if falling:
        log.warning("the held-out chosen reward fell at each of the last %d evaluations (%s) and is below where it "
                    "started: the tuned model finds the preferred replies less likely than before. Try: %s", k,
                    ", ".join(f"{v:.3g}" for v in history[-k - 1 :]), FALLING_ADVICE)  # fmt: skip
    return falling


def _heldout_history(out_dir: Path, before: float) -> list[float]:
    """The held-out chosen reward before training and at every evaluation the run recorded (resumed runs too)."""
    history = [before]
    path = out_dir / METRICS_FILE
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        record = json.loads(line)
        if f"{HELDOUT}rewards/chosen" in record:
            history.append(record[f"{HELDOUT}rewards/chosen"])
    return history


@dataclass
class _Data:
    train: list[RenderedPair]
    heldout: list[RenderedPair]
    train_desirable: list[bool] | None
    heldout_desirable: list[bool] | None
    skipped: Skipped


def _render(tok: Any, train_records: Sequence[Any], heldout_records: Sequence[Any], loss_type: str, max_len: int,
            max_prompt_len: int | None, seed: int) -> _Data:  # fmt: skip
    skipped = Skipped()
    if loss_type != "kto":
        if any(not isinstance(r, PreferencePair) for r in (*train_records, *heldout_records)):
            raise ValueError(f"loss_type={loss_type!r} trains on preference pairs; these records are unpaired "
                             "(labelled replies): use loss_type='kto'")  # fmt: skip
        sides = []
        for records in (train_records, heldout_records):
            ties = [p for p in records if p.tie]
            for p in ties:
                skipped.add(p.source, "tie: the annotators preferred neither reply")
            sides.append(render_pairs(tok, [p for p in records if not p.tie], max_len, skipped, max_prompt_len))
        return _Data(sides[0], sides[1], None, None, skipped)
    unpaired = [unpair([r]) if isinstance(r, PreferencePair) else [r] for r in train_records]
    held = [unpair([r]) if isinstance(r, PreferencePair) else [r] for r in heldout_records]
    train_pairs, train_labels = render_kto(tok, [x for xs in unpaired for x in xs], max_len, skipped, seed,
                                           max_prompt_len)  # fmt: skip
    held_pairs, held_labels = (render_kto(tok, [x for xs in held for x in xs], max_len, skipped, seed, max_prompt_len)
                               if heldout_records else ([], []))  # fmt: skip
    return _Data(train_pairs, held_pairs, train_labels, held_labels, skipped)


def _reference_caches(model: nn.Module, data: _Data, out_dir: Path, checkpoint: Path, pad_id: int, batch_size: int,
                      world: Any) -> tuple[ReferenceLogps, ReferenceLogps | None]:  # fmt: skip
    """The training and held-out caches: rank 0 computes what is missing, then every rank reads them."""
    key = inputs_fingerprint(checkpoint)

    def build() -> tuple[ReferenceLogps, ReferenceLogps | None]:
        train_ref = reference_logps(model, data.train, pad_id, out_dir / REF_DIR / "train", key,
                                    batch_size=batch_size, chunk_size=batch_size * 8)  # fmt: skip
        held_ref = (reference_logps(model, data.heldout, pad_id, out_dir / REF_DIR / "heldout", key,
                                    batch_size=batch_size, chunk_size=batch_size * 8) if data.heldout else None)  # fmt: skip
        return train_ref, held_ref

    if world.distributed:
        with collective_errors("computing the reference cache", world):
            if world.is_main:
                build()
            torch.distributed.barrier()
    return build()


def train_dpo(
    checkpoint: Path,
    train_pairs: Sequence[PreferencePair | LabelledReply],
    heldout_pairs: Sequence[PreferencePair | LabelledReply],
    out_dir: Path,
    train_cfg: TrainConfig,
    *,
    loss_type: LossType = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    method: Literal["full", "lora"] = "full",
    lora: LoRAConfig | None = None,
    reference: Literal["cached", "frozen"] = "cached",
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    falling_evals: int = 3,
    seed: int = 0,
    parallel: ParallelConfig | None = None,
) -> dict[str, Any]:
    """Tune `checkpoint` with one loss of the DPO family on `train_pairs` (KTO: labelled replies, or pairs it
    unpairs), reporting the loss's metrics on `heldout_pairs` before and after and at every evaluation
    (`heldout/...` in metrics.jsonl). Writes out_dir/final/ (see the module docstring). `max_len` caps prompt +
    reply in tokens (default: the model's context); with `max_prompt_len` a longer prompt keeps its tail, without it
    a prompt that leaves no room for a reply is skipped and counted. `chosen_reward_falling` in the result is True when the held-out
    chosen reward fell at each of the last `falling_evals` evaluations and ended below its start (logged too)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if method not in ("full", "lora"):
        raise ValueError(f"method={method!r}: the DPO family trains 'full' or 'lora'")
    if reference not in ("cached", "frozen"):
        raise ValueError(f"reference={reference!r}: choose 'cached' or 'frozen'")
    if lora is not None and method != "lora":
        raise ValueError(f"a LoRAConfig was given but method={method!r}; pass method='lora' to use it")
    world = init_world(parallel or ParallelConfig(), train_cfg.device)
    if world.distributed and (world.pp_size > 1 or (parallel and parallel.data != "ddp")):
        raise ValueError("DPO runs data parallel with parallel.data=ddp only (no fsdp or pipeline)")
    check_batch(train_cfg, world)
    model, args = load_model(checkpoint, device=world.device, dtype=torch.float32)
    tok = load_checkpoint_tokenizer(checkpoint)
    max_len = max_len or args.max_seq_len
    if max_len > args.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={args.max_seq_len}")
    data = _render(tok, train_pairs, heldout_pairs, loss_type, max_len, max_prompt_len, seed)
    if not data.train:
        raise ValueError(f"no training pair could be rendered ({data.skipped.count} skipped: "
                         f"{data.skipped.examples[:3]})")  # fmt: skip
    batch = train_cfg.batch_size
    train_ref = held_ref = None
    frozen: dict[str, nn.Module] = {}
    if loss_type != "simpo" and reference == "cached":
        train_ref, held_ref = _reference_caches(model, data, out_dir, checkpoint, tok.pad_id, batch, world)
    elif loss_type != "simpo":
        frozen["reference"] = copy.deepcopy(model).eval().requires_grad_(False)  # before any adapter: the start
    writer = lambda m, d: write_model_files(m, args, d, checkpoint / TOKENIZER)  # noqa: E731
    if method == "lora":
        torch.manual_seed(seed)  # the A matrices are drawn at random: the same seed gives the same adapters
        apply_lora(model, lora or LoRAConfig(), ADAPTER_NAME)
        writer = live_checkpoint_writer(lambda m, d: save_adapter(m, ADAPTER_NAME, d / ADAPTER_DIR))
    trainable, total = trainable_parameters(model)
    options = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                   desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)  # fmt: skip
    loss = PreferenceLoss(**options, reference=train_ref)  # type: ignore[arg-type]
    held_loss = PreferenceLoss(**options, reference=held_ref)  # type: ignore[arg-type]
    source = (KTOBatches(data.train, data.train_desirable, batch, tok.pad_id, seed, world.dp_rank, world.dp_size)
              if data.train_desirable is not None else
              PairBatches(data.train, batch, tok.pad_id, seed, world.dp_rank, world.dp_size))  # fmt: skip

    def heldout(m: nn.Module, step: int = 0) -> dict[str, float]:
        found = heldout_metrics(m, held_loss, data.heldout, tok.pad_id, batch, frozen.get("reference"),
                                data.heldout_desirable)  # fmt: skip
        return {HELDOUT + name: value for name, value in found.items()}

    callbacks = [heldout] if data.heldout else []
    before = heldout(model) if data.heldout else {}
    metrics = train(model, loss, source, train_cfg, out_dir, write_model_files=writer, parallel=parallel,
                    frozen=frozen, callbacks=callbacks)  # fmt: skip
    after = heldout(model) if data.heldout else {}
    falling = bool(before) and warn_if_chosen_falls(
        _heldout_history(out_dir, before[f"{HELDOUT}rewards/chosen"]), falling_evals)
    if world.is_main and method == "lora":  # rank 0 writes, as the loop does
        save_adapter(model, ADAPTER_NAME, out_dir / ADAPTER_DIR)  # before merging: the adapter alone
        write_plain(model, args, out_dir / FINAL_DIR, checkpoint / TOKENIZER)
    return {**metrics, "loss_type": loss_type, "beta": beta, "method": method, "reference": reference,
            "heldout_before": before, "heldout_after": after, "chosen_reward_falling": falling,
            "trainable_params": trainable, "total_params": total, "train_pairs": len(data.train),
            "heldout_pairs": len(data.heldout), "skipped_records": data.skipped.count,
            "skipped_examples": data.skipped.examples}  # fmt: skip
