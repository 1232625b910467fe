"""Settings of the grpo stage and `lmforge grpo` (the `grpo` section, docs/alignment.md "GRPO")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lmforge.align.rewards import REWARDS
from lmforge.settings import Section
from lmforge.train.config import TrainConfig


class GRPOTrainConfig(TrainConfig):
    """The training settings of the grpo stage: TrainConfig with defaults for a short RL run from a fine-tuned
    checkpoint. `batch_size` counts prompts (each sampled `grpo.group_size` times); `seq_len` is unused (a
    rollout's rows are its prompt and reply)."""

    seq_len: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)  # prompts per micro-batch, over all ranks
    max_steps: int = Field(20, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    weight_decay: float = Field(0.0, ge=0.0)
    eval_every: int = Field(100, gt=0)
    ckpt_every: int = Field(10, gt=0)


class GRPOConfig(Section):
    """The grpo stage (docs/alignment.md, "GRPO"): group-relative policy optimisation of the model before it with
    verifiable rewards."""

    # "docstring_pairs": the sft stage's signature + docstring prompts from the curated code (training prompts from
    # curate/train, held-out ones from curate/val). Otherwise a prompts file (lmforge.align.prompts: MBPP, GSM8K,
    # messages or prompt records), of which val_fraction is held out unless heldout_prompts names a file.
    prompts: str = "docstring_pairs"
    format: Literal["mbpp", "gsm8k", "messages", "prompt"] | None = None  # a prompts file's, else detected
    heldout_prompts: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0)  # read only the first N records of a prompts file
    max_prompts: int | None = Field(2000, gt=0)  # docstring_pairs: cap on training prompts
    # Held-out prompts for the greedy check before and after and the held-out reward at eval_every: at most this
    # many, evenly spread (docstring_pairs: the same 24 the sft stage checks, with sft's defaults).
    heldout_size: int = Field(24, gt=0)
    gen_tokens: int = Field(96, gt=0)  # greedy check: new tokens per held-out reply (the sft stage's gen_tokens)
    # {reward name: weight} (lmforge.align.rewards.REWARDS) and the options their factories take
    rewards: dict[str, float] = Field(default_factory=lambda: {"completes_function": 1.0})
    reward_options: dict[str, Any] = Field(default_factory=dict)  # e.g. {length_target: 64, timeout_s: 1.0}
    group_size: int = Field(8, ge=2)  # replies sampled per prompt
    max_new_tokens: int = Field(96, gt=0)  # per sampled reply
    temperature: float = Field(1.0, gt=0)  # sampling temperature; the loss scores the same distribution
    beta: float = Field(0.0, ge=0.0)  # weight of the k3 KL to the reference (0: no KL term, no reference in the loss)
    epsilon: float = Field(0.2, gt=0.0, lt=1.0)  # the ratio's clip range
    iterations: int = Field(1, ge=1)  # optimizer steps per rollout (>1: the clipped ratio matters)
    scale_rewards: bool = True  # divide the group-centred rewards by the group's standard deviation
    # Guards: a KL to the reference (k3, per reply token; loads the reference) or a mean reward above these
    # limits, or either not finite, stops the run (on_blowup: stop) or logs a warning (warn).
    max_kl: float | None = Field(None, gt=0)
    max_reward: float | None = None
    on_blowup: Literal["stop", "warn"] = "stop"
    train: GRPOTrainConfig = Field(default_factory=GRPOTrainConfig)

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(REWARDS))
        if not value or unknown:
            raise ValueError(f"grpo.rewards={value}: name at least one reward, each one of {sorted(REWARDS)}")
        return value
