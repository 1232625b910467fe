"""Settings of the dpo stage and `lmforge dpo` (the `dpo` section, docs/alignment.md, "The DPO family")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.settings import Section
from lmforge.train.config import TrainConfig


class DPOTrainConfig(TrainConfig):
    """The training settings of the dpo stage: TrainConfig with defaults for preference tuning a fine-tuned model
    (batches of pairs, a low AdamW learning rate, a short warm-up, no weight decay)."""

    seq_len: int | None = Field(None, gt=0)  # unused: dpo.max_len caps each side
    batch_size: int = Field(16, gt=0)  # pairs per micro-batch (each pair is two sequences); KTO: examples
    max_steps: int = Field(100, gt=0)
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_every: int = Field(25, gt=0)  # held-out metrics (and the falling-chosen-reward check) at each
    ckpt_every: int = Field(50, gt=0)


class DPOConfig(Section):
    """The dpo stage (docs/alignment.md, "The DPO family"): DPO, robust DPO, IPO, SimPO or KTO on preference data."""

    # A preference file (hh-rlhf, TRL, LLaMA-Factory dpo or kto, PandaLM: lmforge.align.preferences); required.
    data: str | None = None
    format: Literal["hh_rlhf", "trl", "llamafactory_dpo", "llamafactory_kto", "pandalm", "lmforge"] | None = None
    limit: int | None = Field(None, gt=0)  # read only the first N records
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # share of the records held out, by train.seed
    heldout_limit: int = Field(200, gt=0)  # at most this many held-out records (the first of the held-out share)
    # sigmoid (DPO), robust (robust DPO), ipo, simpo (reference-free) or kto (unpaired: pairs are split into a
    # desirable and an undesirable reply)
    loss: Literal["sigmoid", "robust", "ipo", "simpo", "kto"] = "sigmoid"
    beta: float = Field(0.1, gt=0)  # SimPO's papers use about 2
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # sigmoid, robust: the assumed label-flip rate
    gamma: float = Field(0.5, ge=0.0)  # simpo: the target reward margin
    desirable_weight: float = Field(1.0, gt=0)  # kto: lambda_d
    undesirable_weight: float = Field(1.0, gt=0)  # kto: lambda_u
    # cached: reference log-probabilities computed once into dpo/reference/; frozen: a copy of the model in memory
    reference: Literal["cached", "frozen"] = "cached"
    method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    max_len: int | None = Field(None, gt=0)  # tokens of prompt + reply per side; None: the model's max_seq_len
    # A longer prompt keeps its last max_prompt_len tokens (the turns the reply answers); None: a prompt that leaves
    # no room for a reply within max_len is skipped and counted.
    max_prompt_len: int | None = Field(None, gt=0)
    falling_evals: int = Field(3, ge=1)  # warn when the held-out chosen reward fell at this many evaluations in a row
    train: DPOTrainConfig = Field(default_factory=DPOTrainConfig)
