"""The alignment losses as plain tensor functions: sequence log-probabilities, the DPO family (DPO, IPO, robust DPO,
SimPO, KTO), the Bradley-Terry reward-model loss and the KL estimators PPO and GRPO penalise with.

Every loss follows the contract of `lmforge.losses`: it returns `(loss, metrics)`, where `loss` is the sum of its
per-pair (per-example) losses as this micro-batch's share of the step (`ctx.share`), which without a context is the
plain mean over the batch. The pair losses count pairs, not tokens: a loop wiring them in passes a context whose
`tokens` is the step's number of pairs.

Rewards are the implicit ones of the DPO paper, `beta * (log pi(y|x) - log ref(y|x))` (SimPO: `beta` times the
policy's per-token mean log-probability; the reward model: its scores), and every pair loss reports the same
metrics: `rewards/chosen`, `rewards/rejected`, `rewards/margin` (their mean difference) and `rewards/accuracy` (the
fraction of pairs whose chosen reward is above the rejected one), all detached.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.losses import LossContext, LossResult, Metrics, cross_entropy
from lmforge.tokenizer import IGNORE_INDEX

DpoLossType = Literal["sigmoid", "ipo", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "robust")
KlEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def sequence_logps(logits: Tensor, labels: Tensor, average: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sequence log-probability of the labelled tokens, in fp32, and their count: ([B], [B]).

    `labels` [B, T] follow the loop's convention (aligned with `logits` [B, T, V]: position t scores label t);
    labels aligned with the inputs, as a chat template's loss mask gives them, go through `shift_labels` first.
    IGNORE_INDEX positions (prompt, padding) count nothing. `average` divides by the count (SimPO, IPO), a
    sequence without a labelled token scoring 0 rather than NaN."""
    logp = -cross_entropy(logits, labels, reduction="none").sum(-1)
    n_tokens = (labels != IGNORE_INDEX).sum(-1)
    return (logp / n_tokens.clamp(min=1) if average else logp), n_tokens


def _reduce(per_example: Tensor, ctx: LossContext | None) -> Tensor:
    """The per-example losses as this micro-batch's share of the step (their mean without a context)."""
    ctx = ctx or LossContext.local(per_example.numel())
    return ctx.share(per_example.sum())


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": (chosen > rejected).float().mean()}


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta={beta}: the loss's temperature must be > 0 (try 0.1)")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, loss_type: DpoLossType = "sigmoid", label_smoothing: float = 0.0,
             ctx: LossContext | None = None) -> LossResult:  # fmt: skip
    """The DPO family on per-pair log-probabilities [B] of the policy and the reference.

    With `h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)` and `e = label_smoothing`:
    - "sigmoid" (DPO; conservative DPO when e > 0): `-(1 - e) logsig(beta h) - e logsig(-beta h)`;
    - "robust" (robust DPO, Chowdhury et al. 2024, unbiased under a flip rate e < 1/2):
      `((1 - e) (-logsig(beta h)) - e (-logsig(-beta h))) / (1 - 2e)`;
    - "ipo": `(h - 1 / (2 beta))^2`. The IPO paper and TRL take h from per-token mean log-probabilities, so pass
      `sequence_logps(..., average=True)` for IPO; summed ones work but put the target margin on another scale.
    Metrics add `logratio/chosen` and `logratio/rejected`, the mean log-ratios policy - reference."""
    _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: the assumed label-flip rate must be in [0, 0.5)")
    chosen_logratio, rejected_logratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        right, flipped = -F.logsigmoid(beta * h), -F.logsigmoid(-beta * h)
        if loss_type == "sigmoid":
            per_pair = (1.0 - label_smoothing) * right + label_smoothing * flipped
        else:
            per_pair = ((1.0 - label_smoothing) * right - label_smoothing * flipped) / (1.0 - 2.0 * label_smoothing)
    metrics = _pair_metrics(beta * chosen_logratio, beta * rejected_logratio)
    metrics["logratio/chosen"] = chosen_logratio.detach().float().mean()
    metrics["logratio/rejected"] = rejected_logratio.detach().float().mean()
    return _reduce(per_pair, ctx), metrics


def simpo_loss(chosen_avg_logp: Tensor, rejected_avg_logp: Tensor, beta: float = 2.0, gamma: float = 0.5,
               ctx: LossContext | None = None) -> LossResult:  # fmt: skip
    """SimPO (Meng et al. 2024), reference-free: `-logsig(beta (chosen_avg - rejected_avg) - gamma)` on the
    policy's per-token mean log-probabilities (`sequence_logps(..., average=True)`), so that a longer response is
    not favoured for its length. The rewards are `beta * avg_logp`; `logp/chosen` and `logp/rejected` report the
    mean per-token log-probabilities."""
    _check_beta(beta)
    chosen_rewards, rejected_rewards = beta * chosen_avg_logp, beta * rejected_avg_logp
    per_pair = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    metrics = _pair_metrics(chosen_rewards, rejected_rewards)
    metrics["logp/chosen"] = chosen_avg_logp.detach().float().mean()
    metrics["logp/rejected"] = rejected_avg_logp.detach().float().mean()
    return _reduce(per_pair, ctx), metrics


def _group_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask`, 0 for an empty group (a batch with no undesirable example, say)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl_ref_point: Tensor | float,
             beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0,
             ctx: LossContext | None = None) -> LossResult:  # fmt: skip
    """KTO (Ethayarajh et al. 2024) on unpaired examples: with the log-ratio `r = policy - ref` and the reference
    point `z0 = max(kl_ref_point, 0)` (detached: the paper does not back-propagate through it), a desirable
    example costs `lambda_d (1 - sig(beta (r - z0)))` and an undesirable one `lambda_u (1 - sig(beta (z0 - r)))`.

    `desirable` is a bool tensor [B]. The rewards are `beta * r`, averaged over each group (0 for an empty one);
    `rewards/accuracy` is the fraction of examples on the right side of the reference point."""
    _check_beta(beta)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable has dtype {desirable.dtype}: expected a bool tensor, True for a desirable example")
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratio = policy_logps - ref_logps
    per_example = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (logratio - z0))),
                              lambda_u * (1 - torch.sigmoid(beta * (z0 - logratio))))  # fmt: skip
    rewards, undesirable = beta * logratio.detach().float(), ~desirable
    chosen, rejected = _group_mean(rewards, desirable), _group_mean(rewards, undesirable)
    right_side = torch.where(desirable, logratio > z0, logratio < z0)
    metrics: Metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
                        "rewards/accuracy": right_side.float().mean(), "kl_ref_point": z0.float(),
                        "logratio/chosen": _group_mean(logratio.detach().float(), desirable),
                        "logratio/rejected": _group_mean(logratio.detach().float(), undesirable)}  # fmt: skip
    return _reduce(per_example, ctx), metrics


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None,
                       center_coef: float = 0.0, ctx: LossContext | None = None) -> LossResult:  # fmt: skip
    """The reward model's loss on scalar scores [B]: `-logsig(r_c - r_r - margin) + center_coef (r_c + r_r)^2` per
    pair, whose batch mean is TRL RewardTrainer's `-logsig(...).mean() + center_coef * mean((r_c + r_r)^2)`. The
    margin (per pair or one number) asks the chosen score to lead by at least that much; the centring term keeps
    the scores near 0, since the Bradley-Terry likelihood sees only their differences."""
    diff = chosen_scores - rejected_scores
    per_pair = -F.logsigmoid(diff - margin if margin is not None else diff)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen_scores + rejected_scores) ** 2
    return _reduce(per_pair, ctx), _pair_metrics(chosen_scores, rejected_scores)


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: KlEstimator = "k3") -> Tensor:
    """Per-token estimates of KL(policy || reference) from the log-probabilities of tokens sampled from the policy
    (Schulman, "Approximating KL divergence"), with `d = ref_logp - logp`:
    - "k1" = -d: unbiased but high-variance, and negative for a token the reference likes more;
    - "k2" = d^2 / 2: low-variance, biased;
    - "k3" = exp(d) - d - 1: unbiased and >= 0 for every token (exp(x) >= 1 + x), lower-variance than k1.
    Each is exactly 0 where the policy equals the reference."""
    d = ref_logp.float() - logp.float()
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"estimator={estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def kl_estimate(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None, estimator: KlEstimator = "k3") -> Tensor:
    """The mean per-token KL estimate over the response tokens `mask` marks (every token without a mask; 0 when
    the mask is empty)."""
    per_token = kl_per_token(logp, ref_logp, estimator)
    if mask is None:
        return per_token.mean()
    return _group_mean(per_token, mask.to(per_token.dtype))
