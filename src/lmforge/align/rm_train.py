"""Reward-model training on the one loop: preference pairs -> PairBatches -> RewardModel -> Bradley-Terry loss.

`train_reward_model` renders the pairs with the checkpoint's chat template (a pair that cannot be rendered is
skipped and counted), starts a RewardModel from the checkpoint (normally the SFT model) with a seeded head, and
trains it with `lmforge.train.loop.train`, so resuming, several ranks and the metrics log work as for every other
stage. Held-out pairwise accuracy (ties half, Wilson 95% interval) is measured before and after training, next to
the longer-answer baseline on the same held-out pairs.

    out_dir/final/                      the reward model (RewardModel.save layout): load_reward_model reads it
    out_dir/checkpoints/step_N/         the live weights the loop resumes from (backbone.* and head.* in
                                        model.safetensors), and reward_model/ beside them: that step's reward
                                        model in the same layout as final/
    out_dir/metrics.jsonl               loss, rewards/{chosen,rejected,margin,accuracy}, length/{chosen,rejected}

The checkpoints keep both because the loop reloads `model.safetensors` strictly into the module it trains (the
RewardModel, whose names carry the `backbone.` prefix), while a reward-model folder stores the backbone under its
own checkpoint names so that `load_model` reads it too; `final/` is written in the reward-model layout alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from safetensors.torch import save_model as st_save_model
from torch import Tensor, nn

from lmforge.align.losses import bradley_terry_loss
from lmforge.align.pair_batches import PairBatches, split_sides
from lmforge.align.preferences import PreferencePair, RenderedPair, render_pair
from lmforge.align.reward_model import RewardModel, longer_answer_baseline, pairwise_accuracy, score_pairs
from lmforge.finetune.data import BadRecord, Skipped
from lmforge.losses import LossContext, LossResult
from lmforge.model.io import WEIGHTS, load_checkpoint_tokenizer, read_model_args, require_checkpoint
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed import check_batch, init_world
from lmforge.train.loop import FINAL_DIR, train
from lmforge.train.loop import OUTPUTS as LOOP_OUTPUTS

log = logging.getLogger(__name__)

RM_DIR = "reward_model"  # inside each training checkpoint: that step's reward-model folder
OUTPUTS = LOOP_OUTPUTS  # what a job writes in its folder
FROM_DATA = "from data"  # margin setting: each pair's own margin (PreferencePair.margin)
Margin = float | Literal["from data"] | None


def reward_loss(margin: float | Tensor | None = None, center_coef: float = 0.0) -> Callable[..., LossResult]:
    """The loop's loss for a RewardModel on PairBatches: Bradley-Terry over the batch's pairs (the loss units),
    with its `rewards/*` metrics plus the mean reply length in tokens of each side (`length/chosen`,
    `length/rejected`), which shows whether the scores follow length. `margin` is one number for every pair or a
    tensor of per-pair margins, read at the batch's `index` (the pairs' positions in the PairBatches)."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor], ctx: LossContext | None = None) -> LossResult:
        chosen, rejected = split_sides(model(batch["input_ids"], batch["lengths"]))
        pair_margin = margin[batch["index"]].to(chosen.device) if isinstance(margin, Tensor) else margin
        loss, metrics = bradley_terry_loss(chosen, rejected, pair_margin, center_coef, ctx)
        reply = (batch["labels"] != IGNORE_INDEX).sum(-1).float()
        chosen_len, rejected_len = split_sides(reply)
        return loss, {**metrics, "length/chosen": chosen_len.mean(), "length/rejected": rejected_len.mean()}

    return loss_fn


def heldout_accuracy(rm: RewardModel, tok: Tokenizer, pairs: Sequence[PreferencePair], max_len: int,
                     max_prompt_len: int | None = None, batch_size: int = 16) -> dict[str, Any]:  # fmt: skip
    """Pairwise accuracy of `rm` on `pairs` (ties half, Wilson 95% interval), the longer-answer baseline on the
    same pairs, and how many pairs could not be scored (rendered as in training: `render_pair`)."""
    scored = score_pairs(rm, tok, pairs, batch_size=batch_size, max_len=max_len, max_prompt_len=max_prompt_len)
    if not scored.index:
        raise ValueError(f"none of the {len(pairs)} held-out pairs could be scored: {scored.skipped.by_reason}")
    return {"accuracy": pairwise_accuracy(scored.chosen, scored.rejected),
            "length_baseline": longer_answer_baseline(scored.chosen_tokens, scored.rejected_tokens),
            "mean_margin": float((scored.chosen - scored.rejected).mean()),
            "skipped": scored.skipped.count}  # fmt: skip


def _checkpoint_writer(tokenizer_dir: Path) -> Callable[[nn.Module, Path], None]:
    """Checkpoint files: the live RewardModel weights the loop reloads, and the reward-model folder beside them."""

    def write(model: nn.Module, directory: Path) -> None:
        st_save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
        model.save(directory / RM_DIR, tokenizer_dir)  # type: ignore[operator]

    return write


def _trainable(tok: Tokenizer, pair: PreferencePair, margin: Margin, max_len: int,
               max_prompt_len: int | None) -> RenderedPair:  # fmt: skip
    """A pair rendered for training; BadRecord when it is a tie, lacks the margin asked for, or cannot render."""
    if pair.tie:
        raise BadRecord("tie: the annotators preferred neither reply")
    if margin == FROM_DATA and pair.margin is None:
        raise BadRecord("no margin: margin='from data' needs each pair's margin (a TRL record's 'margin' key)")
    return render_pair(tok, pair, max_len, max_prompt_len)


def _fmt(acc: dict[str, Any]) -> str:
    return f"{acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]"


def train_reward_model(
    checkpoint: Path | str,
    train_pairs: Sequence[PreferencePair],
    heldout_pairs: Sequence[PreferencePair],
    out_dir: Path | str,
    train_cfg: TrainConfig,
    *,
    margin: Margin = None,
    center_coef: float = 0.0,
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    seed: int = 0,
    parallel: ParallelConfig | None = None,
) -> dict[str, Any]:
    """Train a reward model from `checkpoint` on `train_pairs` into `out_dir/final/` (see the module docstring);
    `heldout_pairs` (may be empty) are scored before and after. `max_len` (default: train_cfg.seq_len, else the
    model's max_seq_len) caps each side's tokens, and a prompt longer than `max_prompt_len` keeps its last
    `max_prompt_len` tokens (the turns the reply answers; without it, a prompt leaving no room is skipped);
    `margin` asks every chosen score to lead by that much (`"from data"`: by each pair's own `margin`, a pair
    without one skipped and counted); `center_coef` weighs the centring term that keeps scores near 0. Ties
    (PandaLM with ties kept) are not preferences: skipped and counted on both sides. Returns the loop's metrics
    plus the held-out results and skip counts."""
    checkpoint, out_dir = require_checkpoint(checkpoint), Path(out_dir)
    world = init_world(parallel or ParallelConfig(), train_cfg.device)
    if world.distributed and (world.pp_size > 1 or (parallel and parallel.data != "ddp")):
        raise ValueError("reward-model training runs data parallel with parallel.data=ddp only (no fsdp or "
                         "pipeline): the scalar head reads the last block's output on every rank")  # fmt: skip
    check_batch(train_cfg, world)
    args = read_model_args(checkpoint)
    max_len = max_len or train_cfg.seq_len or args.max_seq_len
    if max_len > args.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={args.max_seq_len}")
    train_cfg = train_cfg.model_copy(update={"seq_len": max_len})
    tok = load_checkpoint_tokenizer(checkpoint)

    skipped, rendered, margins = Skipped(), [], []
    for i, pair in enumerate(train_pairs):
        try:
            rendered.append(_trainable(tok, pair, margin, max_len, max_prompt_len))
            margins.append(pair.margin)
        except BadRecord as e:
            skipped.add(pair.source or f"pair[{i}]", str(e))
    if skipped.count:
        log.warning("%d of %d training pairs skipped: %s", skipped.count, len(train_pairs), skipped.by_reason)
    if not rendered:
        raise ValueError(f"none of the {len(train_pairs)} training pairs could be rendered within max_len={max_len}"
                         f": {skipped.by_reason} (first: {skipped.examples[:3]})")  # fmt: skip
    heldout = [p for p in heldout_pairs if not p.tie]  # a tie has no right answer to score
    loader = PairBatches(rendered, train_cfg.batch_size, tok.pad_id, seed, rank=world.dp_rank,
                         world_size=world.dp_size)  # fmt: skip

    torch.manual_seed(seed)  # the head's start: the same seed gives the same reward model
    rm = RewardModel.from_checkpoint(checkpoint)
    if not args.tie_embeddings:  # the output layer plays no part in a score: keep it out of the optimizer
        rm.backbone.lm_head.requires_grad_(False)
    before = heldout_accuracy(rm, tok, heldout, max_len, max_prompt_len) if heldout else None
    if before:
        log.info("held-out accuracy before training: %s (longer answer: %s)", _fmt(before["accuracy"]),
                 _fmt(before["length_baseline"]))  # fmt: skip
    pair_margins = torch.tensor(margins, dtype=torch.float32) if margin == FROM_DATA else margin
    metrics = train(rm, reward_loss(pair_margins, center_coef), loader, train_cfg, out_dir,
                    write_model_files=_checkpoint_writer(checkpoint), parallel=parallel)  # fmt: skip
    after = heldout_accuracy(rm, tok, heldout, max_len, max_prompt_len) if heldout else None
    if after:
        log.info("held-out accuracy after training: %s (longer answer: %s)", _fmt(after["accuracy"]),
                 _fmt(after["length_baseline"]))  # fmt: skip
    if world.is_main:  # as the loop writes final/: rank 0, replacing the loop's copy by the reward-model layout
        rm.save(out_dir / FINAL_DIR, checkpoint)
    if world.distributed:
        torch.distributed.barrier()
    return {**metrics, "heldout_before": before, "heldout_after": after, "train_pairs": len(rendered),
            "heldout_pairs": len(heldout), "heldout_ties": len(heldout_pairs) - len(heldout),
            "skipped_pairs": skipped.count, "skipped_by_reason": skipped.by_reason,
            "skipped_examples": skipped.examples, "max_len": max_len, "max_prompt_len": max_prompt_len,
            "margin": margin, "center_coef": center_coef}  # fmt: skip
