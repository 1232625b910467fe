"""PPO for language models (Ziegler et al. 2019, Ouyang et al. 2022): the policy with its value head, generalised
advantage estimation, whitening, the clipped policy and value losses, and the adaptive KL controller.

The policy and the critic share one trunk: `PolicyWithValue` is the policy Transformer plus a Linear(d_model, 1)
value head on its final hidden states, so one forward gives both the logits and the values. On a 2-core CPU that
halves the cost of every rollout and every minibatch against a separate critic (a second Transformer of the same
size). The known price is interference: the value loss's gradient reaches the trunk the policy uses, and early
value errors are large (the head starts at zero while the scores do not), which can drag the policy's features
around. `vf_coef` scales the value loss against the policy loss to keep that pull small, and `cliprange_value`
keeps each update's value change near the values the rollout saw (TRL's and the InstructGPT recipe's remedies).
The value head lives inside the trained module, as the training loop asks of trainable extras; the final model
drops it (`PolicyWithValue.policy` is a plain Transformer).

The rollout buffer (the batch source the loop trains from) and `train_ppo` are in lmforge.align.ppo_train.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.align.rollout import logits_token_stats
from lmforge.losses import LossContext, LossResult
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import IGNORE_INDEX

WHITEN_EPS = 1e-8


class PolicyWithValue(nn.Module):
    """The policy Transformer and a scalar value head on its final (normed) hidden states.

    The head starts at zero (values 0): its own gradient, the hidden state times the value error, is non-zero from
    the first step, and a zero start draws no random numbers, so the run's RNG stream is the policy's alone."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.args.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(policy.parameters()).device)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids [B, T] -> (logits [B, T, V], fp32 values [B, T]) from one pass through the trunk; the logits are
        exactly `policy(input_ids)`'s (the head's norm, output layer and soft cap applied to the same states)."""
        hidden = self.policy(input_ids, return_hidden=True)
        logits = self.policy.lm_head(hidden)
        cap = self.policy.args.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits.float() / cap)
        return logits, self.value_head(hidden).squeeze(-1).float()


def last_positions(mask: Tensor) -> Tensor:
    """The index of each row's last True position [N] (the last reply token); 0 for a row with none."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).max(dim=1).values


def token_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [N, T]: the KL penalty `-kl_coef * (logp - ref_logp)` on every reply token (the k1
    estimate on the sampled tokens, as Ziegler et al.), plus the sequence's score [N] on its last reply token."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_positions(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's reply tokens: (advantages, returns) [N, T], 0 off the mask.

    `delta_t = r_t + gamma V_{t+1} - V_t` and `A_t = delta_t + gamma lam A_{t+1}`, with V and A after a row's last
    reply token taken as 0 (the episode ends there); returns are `A_t + V_t`, the value loss's targets."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        on = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(on, delta + gamma * lam * running, torch.zeros_like(running))
        next_value = torch.where(on, values[:, t], torch.zeros_like(next_value))
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_mean_var(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of `x` where `mask` (the variance of one value is taken as 0)."""
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return mean, var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """`x` scaled to unit variance over the masked positions, and centred unless `shift_mean` is false (rewards are
    whitened without centring, so that a positive score stays a reward); 0 off the mask."""
    mean, var = masked_mean_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the reply tokens: 1 for a perfect critic, 0 for one that
    predicts the mean, negative for a worse one; NaN when the returns do not vary."""
    _, var_returns = masked_mean_var(returns, mask)
    _, var_error = masked_mean_var(returns - values, mask)
    return float(1 - var_error / var_returns) if var_returns > 0 else float("nan")


@dataclass(frozen=True)
class TokenLosses:
    """Per-token terms [N, T] of the PPO loss, 0 off the reply tokens."""

    policy: Tensor
    value: Tensor
    policy_clipped: Tensor  # 1 where the clipped policy term was the larger (its gradient is cut)
    value_clipped: Tensor


def ppo_token_losses(logps: Tensor, old_logps: Tensor, values: Tensor, old_values: Tensor, advantages: Tensor,
                     returns: Tensor, mask: Tensor, cliprange: float,
                     cliprange_value: float) -> TokenLosses:  # fmt: skip
    """The clipped surrogate `max(-A r, -A clip(r, 1 - eps, 1 + eps))` with `r = exp(logp - old_logp)`, and the
    clipped value loss `0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)` (Schulman et al. 2017;
    the value clipping of OpenAI's baselines), per token."""
    ratio = torch.exp(logps - old_logps)
    pg_plain = -advantages * ratio
    pg_clip = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_plain, vf_clip = (values - returns) ** 2, (v_clipped - returns) ** 2
    on = mask.to(logps.dtype)
    return TokenLosses(policy=torch.maximum(pg_plain, pg_clip) * on, value=0.5 * torch.maximum(vf_plain, vf_clip) * on,
                       policy_clipped=(pg_clip > pg_plain).to(on.dtype) * on,
                       value_clipped=(vf_clip > vf_plain).to(on.dtype) * on)  # fmt: skip


class PPOLoss:
    """The loop's loss on a minibatch of rollout rows: the clipped policy loss plus `vf_coef` times the clipped
    value loss, summed over the reply tokens as this micro-batch's share of the step (`ctx.tokens` counts the
    step's reply tokens). Metrics: the per-token means of both losses, of the clipped shares (`clip_fraction`,
    `value_clip_fraction`), of the entropy at the sampling temperature and of `approx_kl` (`(logp - old)^2 / 2`,
    how far the minibatch moved from the rollout's policy), and the rollout's statistics the batch carries."""

    def __init__(self, temperature: float, cliprange: float, cliprange_value: float, vf_coef: float) -> None:
        self.temperature, self.cliprange, self.cliprange_value = temperature, cliprange, cliprange_value
        self.vf_coef = vf_coef

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], ctx: LossContext | None = None) -> LossResult:
        logits, values = model(batch["input_ids"])
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        logps, entropy = logits_token_stats(logits, labels, self.temperature)
        terms = ppo_token_losses(logps, batch["old_logps"], values, batch["old_values"], batch["advantages"],
                                 batch["returns"], mask, self.cliprange, self.cliprange_value)  # fmt: skip
        ctx = ctx or LossContext.local(mask.sum())
        loss = ctx.share((terms.policy + self.vf_coef * terms.value).sum())
        drift = 0.5 * ((logps - batch["old_logps"]) ** 2 * mask).sum()
        metrics = {"policy_loss": ctx.mean(terms.policy.sum().detach()),
                   "value_loss": ctx.mean(terms.value.sum().detach()),
                   "clip_fraction": ctx.mean(terms.policy_clipped.sum()),
                   "value_clip_fraction": ctx.mean(terms.value_clipped.sum()),
                   "entropy": ctx.mean(entropy.detach().sum()), "approx_kl": ctx.mean(drift.detach())}  # fmt: skip
        return loss, {**metrics, **batch["stats"]}


class AdaptiveKL:
    """The KL coefficient of Ziegler et al. (2019): fixed without a target; with one, after each rollout
    `kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon`, n being the rollout's samples, so the
    per-sequence KL drifts towards `target` over about `horizon` samples."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        if kl_coef < 0 or (target is not None and target <= 0) or horizon <= 0:
            raise ValueError(f"kl_coef={kl_coef}, target_kl={target}, kl_horizon={horizon}: expected kl_coef >= 0, "
                             "target_kl > 0 (or none for a fixed coefficient) and kl_horizon > 0")  # fmt: skip
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        """Move the coefficient after a rollout whose mean per-sequence KL was `kl`; returns the new value."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


__all__ = ["PolicyWithValue", "token_rewards", "gae", "whiten", "explained_variance", "ppo_token_losses", "PPOLoss",
           "AdaptiveKL", "last_positions", "TokenLosses"]
