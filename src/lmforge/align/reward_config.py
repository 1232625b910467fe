"""Settings of the reward stage and `lmforge reward` (the `reward` section, docs/alignment.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.settings import Section
from lmforge.train.config import TrainConfig


class RewardTrainConfig(TrainConfig):
    """The training settings of the reward stage: TrainConfig with defaults for a reward model started from a
    fine-tuned checkpoint (batches of pairs, a low AdamW learning rate, a short warm-up)."""

    seq_len: int | None = Field(None, gt=0)  # tokens per side (prompt + reply); None: reward.max_len or the model's
    batch_size: int = Field(16, gt=0)  # pairs per micro-batch (each pair is two sequences)
    max_steps: int = Field(200, gt=0)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_every: int = Field(100, gt=0)
    ckpt_every: int = Field(100, gt=0)


class RewardConfig(Section):
    """The reward stage (docs/alignment.md, "Training a reward model"): a reward model on preference pairs."""

    # A preference file (hh-rlhf, TRL, LLaMA-Factory dpo, PandaLM: lmforge.align.preferences); required.
    data: str | None = None
    # A second preference file to evaluate on; without it, val_fraction of `data` is held out by train.seed.
    heldout_data: str | None = None
    # The files' format (lmforge.align.preferences), else detected from the first record.
    format: Literal["hh_rlhf", "trl", "llamafactory_dpo", "pandalm", "lmforge"] | None = None
    limit: int | None = Field(None, gt=0)  # read only the first N pairs of each file
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # the share of `data` held out when no heldout_data
    max_len: int | None = Field(None, gt=0)  # tokens per side (prompt + reply); a longer reply keeps its head
    # A longer prompt keeps its last max_prompt_len tokens (the turns the reply answers); None: a prompt that leaves
    # no room for a reply within max_len is skipped and counted.
    max_prompt_len: int | None = Field(None, gt=0)
    # The chosen score must lead the rejected one by this much; "from data": by each pair's own margin (a TRL
    # record's `margin` key; a pair without one is skipped and counted); None: no margin.
    margin: float | Literal["from data"] | None = None
    center_coef: float = Field(0.0, ge=0.0)  # weight of (r_chosen + r_rejected)^2, keeping scores near 0
    train: RewardTrainConfig = Field(default_factory=RewardTrainConfig)
