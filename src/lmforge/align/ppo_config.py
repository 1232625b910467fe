"""Settings of the ppo stage and `lmforge ppo` (the `ppo` section, docs/alignment.md "PPO")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lmforge.settings import Section
from lmforge.train.config import TrainConfig


class PPOTrainConfig(TrainConfig):
    """The training settings of the ppo stage: TrainConfig with defaults for tuning a fine-tuned policy. One step is
    one minibatch of a rollout (ppo.rollout_size / ppo.minibatches rows, split into grad_accum micro-batches), so
    train.batch_size and train.seq_len are not read."""

    seq_len: int | None = Field(None, gt=0)  # not read: a rollout row is its prompt and its reply
    max_steps: int = Field(100, gt=0)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    weight_decay: float = Field(0.0, ge=0.0)
    eval_every: int = Field(20, gt=0)
    ckpt_every: int = Field(20, gt=0)
    # The loop's ratio test against the running mean loss is off: the clipped surrogate swings around 0, where a
    # ratio says nothing (non-finite steps are still skipped; ppo.max_kl and ppo.max_reward guard the run).
    spike_factor: float = Field(1e9, gt=1.0)


class PPOConfig(Section):
    """The ppo stage (docs/alignment.md, "PPO"): the model before it tuned with PPO on a prompt file, scored by a
    reward model or by reward functions."""

    prompts: str | None = None  # the prompt file (lmforge.align.prompts: mbpp, gsm8k, messages, prompt); required
    format: Literal["mbpp", "gsm8k", "messages", "prompt"] | None = None  # else detected from the first record
    limit: int | None = Field(None, gt=0)  # read only the first N prompts
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # prompts held out (seeded), answered at every eval_every
    # The scores come from exactly one of reward_model and rewards. A reward model folder
    # (lmforge.align.reward_model), or "reward": this run's reward stage.
    reward_model: str | None = None
    # Reward functions by name with their weights (lmforge.align.rewards), e.g. {ends_turn: 1.0}.
    rewards: dict[str, float] = Field(default_factory=dict)
    reward_options: dict[str, Any] = Field(default_factory=dict)  # options of the rewards (length_target: 64)
    rollout_size: int = Field(16, gt=0)  # prompts (one reply each) per rollout
    minibatches: int = Field(2, gt=0)  # optimizer steps per pass over a rollout
    epochs: int = Field(2, gt=0)  # passes over each rollout
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)  # sampling temperature; the log-probs are taken at the same one
    kl_coef: float = Field(0.05, ge=0.0)  # weight of the per-token KL penalty (the start value when adaptive)
    target_kl: float | None = Field(None, gt=0)  # per-sequence KL the adaptive controller steers to; None: fixed
    kl_horizon: int = Field(10000, gt=0)  # samples over which the adaptive controller closes the gap
    gamma: float = Field(1.0, ge=0.0, le=1.0)  # discount
    lam: float = Field(0.95, ge=0.0, le=1.0)  # GAE lambda
    cliprange: float = Field(0.2, gt=0.0)  # the policy ratio's clip range
    cliprange_value: float = Field(0.2, gt=0.0)  # how far a value may move from the rollout's
    vf_coef: float = Field(0.1, ge=0.0)  # the value loss's weight against the policy loss
    whiten_rewards: bool = False  # scale the token rewards to unit variance over each rollout before GAE
    max_kl: float | None = Field(None, gt=0)  # stop (or warn) when a rollout's per-sequence KL exceeds it
    max_reward: float | None = None  # stop (or warn) when a rollout's mean reward exceeds it (a loophole)
    on_blowup: Literal["stop", "warn"] = "stop"
    train: PPOTrainConfig = Field(default_factory=PPOTrainConfig)
