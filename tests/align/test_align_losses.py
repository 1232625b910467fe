"""The alignment losses (lmforge.align.losses) against values worked out by hand with math, their gradients'
directions, and the KL estimators' properties."""

import math

import pytest
import torch

from lmforge.align.losses import (bradley_terry_loss, dpo_loss, kl_estimate, kl_per_token, kto_loss, sequence_logps,
                                  simpo_loss)  # fmt: skip
from lmforge.losses import LossContext, shift_labels
from lmforge.tokenizer import IGNORE_INDEX


def softplus(x: float) -> float:
    """-log sigmoid(-x), written out: log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(actual: torch.Tensor | float, expected: float, tol: float = 1e-6) -> bool:
    return abs(float(torch.as_tensor(actual).detach()) - expected) <= tol


# -- sequence log-probabilities ---------------------------------------------------------------------------------


def test_sequence_logps_sums_the_labelled_tokens_log_probabilities_in_fp32():
    # Every position's logits are [0, 1, 2, 3]: log p(k) = k - log(1 + e + e^2 + e^3).
    logz = math.log(sum(math.exp(k) for k in range(4)))
    logits = torch.arange(4.0).expand(2, 3, 4).to(torch.bfloat16)
    labels = torch.tensor([[3, IGNORE_INDEX, 1], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    logp, n = sequence_logps(logits, labels)
    assert logp.dtype == torch.float32 and n.tolist() == [2, 0]
    assert close(logp[0], (3 - logz) + (1 - logz), 1e-5) and logp[1].item() == 0.0
    mean, n = sequence_logps(logits, labels, average=True)
    assert close(mean[0], ((3 - logz) + (1 - logz)) / 2, 1e-5)
    assert mean[1].item() == 0.0  # no labelled token: 0, not NaN


def test_sequence_logps_with_labels_aligned_with_the_inputs_scores_token_i_from_position_i_minus_1():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4]])  # the prompt is [1, 2], the response [3, 4]
    logp, n = sequence_logps(logits, shift_labels(labels))
    lp = logits.log_softmax(-1)
    manual = lp[0, 1, ids[0, 2]] + lp[0, 2, ids[0, 3]]  # token 2 from position 1, token 3 from position 2
    assert n.tolist() == [2]
    torch.testing.assert_close(logp, manual[None], rtol=0, atol=1e-6)


# -- DPO, IPO, robust DPO -----------------------------------------------------------------------------------------

# Pair 0: chosen log-ratio 1, rejected -0.5, h = 1.5. Pair 1: chosen log-ratio -1, rejected 1, h = -2.
PC, PR, RC, RR = (torch.tensor(v) for v in ([-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.0], [-2.5, -3.0]))
H = (1.5, -2.0)


def test_dpo_sigmoid_by_hand():
    beta = 0.5
    loss, m = dpo_loss(PC, PR, RC, RR, beta=beta)
    assert close(loss, (softplus(-beta * H[0]) + softplus(-beta * H[1])) / 2)
    assert close(m["rewards/chosen"], (0.5 * 1 + 0.5 * -1) / 2) and close(m["rewards/rejected"], (0.5 * -0.5 + 0.5) / 2)
    assert close(m["rewards/margin"], (0.5 * 1.5 + 0.5 * -2) / 2) and close(m["rewards/accuracy"], 0.5)
    assert close(m["logratio/chosen"], 0.0) and close(m["logratio/rejected"], 0.25)
    # conservative DPO: e of the labels assumed flipped
    e = 0.2
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=e)
    by_hand = [(1 - e) * softplus(-beta * h) + e * softplus(beta * h) for h in H]
    assert close(loss, sum(by_hand) / 2)


def test_ipo_is_the_squared_distance_of_h_from_one_over_two_beta():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    assert close(loss, ((1.5 - 2) ** 2 + (-2 - 2) ** 2) / 2)


def test_robust_dpo_by_hand_and_equal_to_sigmoid_without_smoothing():
    beta, e = 0.5, 0.1
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=e)
    by_hand = [((1 - e) * softplus(-beta * h) - e * softplus(beta * h)) / (1 - 2 * e) for h in H]
    assert close(loss, sum(by_hand) / 2)
    torch.manual_seed(1)
    logps = [torch.randn(16) for _ in range(4)]
    robust, rm = dpo_loss(*logps, beta=0.3, loss_type="robust", label_smoothing=0.0)
    plain, pm = dpo_loss(*logps, beta=0.3, loss_type="sigmoid")
    assert torch.equal(robust, plain) and all(torch.equal(rm[k], pm[k]) for k in pm)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_dpo_gradient_raises_the_chosen_log_ratio_and_lowers_the_rejected(loss_type):
    """One gradient step on the policy's logits makes the chosen response likelier and the rejected one less so."""
    torch.manual_seed(2)
    logits = torch.zeros(2, 3, 6, requires_grad=True)  # row 0: chosen, row 1: rejected
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [3, 4, 5]])
    ref, _ = sequence_logps(torch.randn(2, 3, 6), labels)
    before, _ = sequence_logps(logits, labels)
    loss, _ = dpo_loss(before[0:1], before[1:2], ref[0:1], ref[1:2], beta=0.1, loss_type=loss_type,
                       label_smoothing=0.1 if loss_type == "robust" else 0.0)  # fmt: skip
    loss.backward()
    with torch.no_grad():
        after, _ = sequence_logps(logits - 0.5 * logits.grad, labels)
    assert after[0] > before[0] and after[1] < before[1]


def test_dpo_share_of_a_step_and_bad_settings():
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, ctx=LossContext(tokens=8))
    total = softplus(-0.5 * H[0]) + softplus(-0.5 * H[1])
    assert close(loss, total / 8)  # 2 pairs of a step of 8
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(PC, PR, RC, RR, beta=0)


# -- SimPO --------------------------------------------------------------------------------------------------------


def test_simpo_by_hand():
    beta, gamma = 2.0, 0.5
    loss, m = simpo_loss(torch.tensor([-0.5, -1.0]), torch.tensor([-1.0, -0.75]), beta=beta, gamma=gamma)
    assert close(loss, (softplus(-(2.0 * 0.5 - 0.5)) + softplus(-(2.0 * -0.25 - 0.5))) / 2)
    assert close(m["rewards/chosen"], 2.0 * -0.75) and close(m["rewards/accuracy"], 0.5)
    assert close(m["logp/chosen"], -0.75) and close(m["logp/rejected"], -0.875)


def test_simpo_is_length_normalised():
    """A 2-token chosen and a 4-token rejected response of the same per-token likelihood tie in SimPO (only the
    margin gamma is left), though their summed log-probabilities differ by 2 log 4."""
    logits = torch.zeros(2, 4, 4)  # uniform: every token has log-probability -log 4
    labels = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX], [0, 1, 2, 3]])
    summed, _ = sequence_logps(logits, labels)
    assert close(summed[0] - summed[1], 2 * math.log(4), 1e-5)
    avg, _ = sequence_logps(logits, labels, average=True)
    loss, m = simpo_loss(avg[0:1], avg[1:2], beta=2.0, gamma=0.5)
    assert close(loss, softplus(0.5), 1e-6) and close(m["rewards/margin"], 0.0)


# -- KTO ----------------------------------------------------------------------------------------------------------


def test_kto_desirable_and_undesirable_branches_by_hand():
    beta, z0, ld, lu = 0.5, 0.2, 1.0, 1.5
    policy = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -2.5])  # log-ratios 1, -1, 0.5
    desirable = torch.tensor([True, False, False])
    loss, m = kto_loss(policy, ref, desirable, z0, beta=beta, lambda_d=ld, lambda_u=lu)
    by_hand = [ld * (1 - sigmoid(beta * (1 - z0))), lu * (1 - sigmoid(beta * (z0 + 1))),
               lu * (1 - sigmoid(beta * (z0 - 0.5)))]
    assert close(loss, sum(by_hand) / 3)
    assert close(m["rewards/chosen"], 0.5) and close(m["rewards/rejected"], 0.5 * (-1 + 0.5) / 2)
    assert close(m["rewards/accuracy"], 2 / 3)  # the third, undesirable, sits above z0
    loss.backward()
    assert policy.grad[0] < 0 and policy.grad[1] > 0 and policy.grad[2] > 0  # up for desirable, down otherwise


def test_kto_reference_point_is_clamped_and_detached_and_empty_groups_report_zero():
    z0 = torch.tensor(-0.3, requires_grad=True)
    policy, ref = torch.tensor([-1.0, -1.5], requires_grad=True), torch.tensor([-2.0, -2.0])
    loss, m = kto_loss(policy, ref, torch.tensor([True, True]), z0, beta=1.0)
    assert close(loss, ((1 - sigmoid(1.0)) + (1 - sigmoid(0.5))) / 2)  # z0 < 0 counts as 0
    loss.backward()
    assert z0.grad is None and policy.grad is not None and m["kl_ref_point"].item() == 0.0
    assert m["rewards/rejected"].item() == 0.0 and close(m["rewards/chosen"], 0.75)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(policy, ref, torch.tensor([1, 0]), 0.0)


# -- Bradley-Terry ------------------------------------------------------------------------------------------------


def test_bradley_terry_by_hand_with_margin_and_centring():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, m = bradley_terry_loss(rc, rr)
    assert close(loss, (softplus(-1.0) + softplus(1.0)) / 2)
    assert close(m["rewards/accuracy"], 0.5) and close(m["rewards/margin"], 0.0)
    loss, _ = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.0]))
    assert close(loss, (softplus(-(1.0 - 0.5)) + softplus(1.0)) / 2)
    loss, _ = bradley_terry_loss(rc, rr, margin=0.5, center_coef=0.1)
    assert close(loss, (softplus(-0.5) + softplus(1.5)) / 2 + 0.1 * ((2 + 1) ** 2 + (0 + 1) ** 2) / 2)


def test_bradley_terry_centring_pulls_the_scores_towards_zero():
    rc, rr = torch.tensor([3.0], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    bradley_terry_loss(rc, rr, center_coef=1.0)[0].backward()
    assert rc.grad.item() > 0 and rr.grad.item() > 0  # a descent step lowers both, their sum 5 heads to 0
    assert close(rc.grad - rr.grad, -2 * sigmoid(-1.0))  # the difference still widens, as without centring


# -- KL estimators ------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand_and_zero_when_policy_is_reference():
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    d = [-0.5, 1.0, 0.0]  # ref - logp
    assert kl_per_token(logp, ref, "k1").tolist() == [[0.5, -1.0, 0.0]]
    assert kl_per_token(logp, ref, "k2").tolist() == [[0.5 * x * x for x in d]]
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), torch.tensor([[math.exp(x) - x - 1 for x in d]]))
    mask = torch.tensor([[True, True, False]])
    assert close(kl_estimate(logp, ref, mask, "k3"), ((math.exp(-0.5) + 0.5 - 1) + (math.exp(1) - 2)) / 2)
    assert kl_estimate(logp, ref, torch.zeros_like(mask), "k1").item() == 0.0
    torch.manual_seed(3)
    same = torch.randn(4, 7)
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_per_token(same, same.clone(), est), torch.zeros(4, 7))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator='k4'"):
        kl_per_token(logp, ref, "k4")  # type: ignore[arg-type]


def test_k3_is_never_negative():
    g = torch.Generator().manual_seed(4)
    logp, ref = 5 * torch.randn(10_000, generator=g), 5 * torch.randn(10_000, generator=g)
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert (kl_per_token(logp, ref, "k1") < 0).any()  # k1 alone goes negative per token


def test_k1_and_k3_estimate_the_true_kl_of_two_categoricals_and_k3_varies_less():
    p, q = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # 0.3 * log 2.5 ~ 0.275
    g = torch.Generator().manual_seed(5)
    x = torch.multinomial(torch.tensor(p), 400_000, replacement=True, generator=g)
    logp, ref = torch.tensor(p).log()[x], torch.tensor(q).log()[x]
    k1, k3 = kl_per_token(logp, ref, "k1"), kl_per_token(logp, ref, "k3")
    for est in (k1, k3):
        assert est.mean() >= 0 and abs(est.mean().item() - true_kl) < 0.01
    assert k3.var() < k1.var()
