"""PPO: GAE, whitening, the clipped losses and the KL controller against hand-computed values; the policy with its
value head; training (the reward rises on a toy task, resume is bit-identical, final/ is a plain policy)."""

import math

import pytest
import torch

from lmforge.align.ppo import (
    AdaptiveKL,
    PolicyWithValue,
    PPOLoss,
    explained_variance,
    gae,
    ppo_token_losses,
    token_rewards,
    whiten,
)
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import IGNORE_INDEX

# One row: a prompt position, three reply tokens, one padding position.
MASK = torch.tensor([[False, True, True, True, False]])
VALUES = torch.tensor([[9.0, 0.5, 0.2, -0.1, 7.0]])
REWARDS = torch.tensor([[5.0, 0.0, 0.0, 1.0, 5.0]])  # off-mask rewards must not leak in


def test_gae_matches_the_hand_computed_recursion():
    adv, ret = gae(REWARDS * MASK, VALUES, MASK, gamma=0.9, lam=0.8)
    # A3 = 1 - (-0.1); A2 = (0 + 0.9 * -0.1 - 0.2) + 0.72 A3; A1 = (0 + 0.9 * 0.2 - 0.5) + 0.72 A2
    a3 = 1.1
    a2 = -0.29 + 0.72 * a3
    a1 = -0.32 + 0.72 * a2
    assert adv[0].tolist() == pytest.approx([0.0, a1, a2, a3, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, a1 + 0.5, a2 + 0.2, a3 - 0.1, 0.0], abs=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    adv, ret = gae(REWARDS * MASK, VALUES, MASK, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 0.5, 0.8, 1.1, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0, 0.0], abs=1e-6)


def test_gae_rows_end_where_their_reply_ends():
    """A short reply's episode ends at its own last token: the next row's values and the padding do not leak."""
    mask = torch.tensor([[False, True, True, True, False], [False, True, False, False, False]])
    values = torch.tensor([[9.0, 0.5, 0.2, -0.1, 7.0], [9.0, 0.25, 3.0, 3.0, 3.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0]])
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[1].tolist() == pytest.approx([0.0, 1.75, 0.0, 0.0, 0.0])
    assert adv[0, 3] == pytest.approx(1.1)


def test_token_rewards_put_the_kl_penalty_on_every_reply_token_and_the_score_on_the_last():
    logps = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, -9.0]])
    rewards = token_rewards(torch.tensor([3.0]), logps, ref, MASK, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1, 3.0, 0.0])


def test_whitening_over_the_masked_positions():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0, -50.0]])
    # mean 2, unbiased variance 1 over the three reply tokens; off-mask positions become 0
    assert whiten(x, MASK)[0].tolist() == pytest.approx([0.0, -1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert whiten(x, MASK, shift_mean=False)[0].tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0, 0.0], abs=1e-6)
    big = torch.randn(4, 50) * 7 + 3
    mask = torch.rand(4, 50) > 0.3
    w = whiten(big, mask)[mask]
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-5) and float(w.var()) == pytest.approx(1.0, abs=1e-4)


def test_clipped_policy_and_value_losses_match_hand_computed_values():
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))  # ratios
    adv = torch.tensor([[2.0, -1.0, 1.0, 1.0]])
    values, old_values, returns = torch.tensor([[0.5, 0.1, -0.5, 2.0]]), torch.zeros(1, 4), torch.ones(1, 4)
    t = ppo_token_losses(logps, old, values, old_values, adv, returns, mask, cliprange=0.2, cliprange_value=0.2)
    # ratio 1.5, A 2: max(-3, -2 * 1.2) = -2.4 (clipped); ratio 0.5, A -1: max(0.5, 0.8) = 0.8 (clipped);
    # ratio 1.1, A 1: -1.1 inside the range; ratio 0.5, A 1: max(-0.5, -0.8) = -0.5 (not clipped: plain is larger)
    assert t.policy[0].tolist() == pytest.approx([-2.4, 0.8, -1.1, -0.5])
    assert t.policy_clipped[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # V 0.5 -> clipped to 0.2: 0.5 max(0.25, 0.64); V 0.1 inside: 0.5 * 0.81; V -0.5 -> -0.2: 0.5 max(2.25, 1.44);
    # V 2 -> 0.2: 0.5 max(1, 0.64)
    assert t.value[0].tolist() == pytest.approx([0.32, 0.405, 1.125, 0.5])
    assert t.value_clipped[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    off = ppo_token_losses(logps, old, values, old_values, adv, returns, torch.zeros_like(mask), 0.2, 0.2)
    assert float(off.policy.abs().sum() + off.value.abs().sum()) == 0.0


def test_adaptive_kl_follows_ziegler_and_a_fixed_coefficient_stays():
    kl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert kl.update(9.0, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # error 0.5 clipped to 0.2
    assert kl.update(5.7, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.05 * 64 / 10000))
    fixed = AdaptiveKL(0.1)
    assert fixed.update(100.0, 64) == 0.1
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKL(0.1, target=0.0)


def test_explained_variance():
    returns = torch.tensor([[0.0, 1.0, 2.0, 4.0, 0.0]])
    assert explained_variance(returns, returns, MASK) == pytest.approx(1.0)
    mean = torch.full_like(returns, 7 / 3)
    assert explained_variance(mean, returns, MASK) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), MASK))


@pytest.fixture
def policy():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=40, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=64,
                     max_seq_len=32)  # fmt: skip
    return Transformer(args)


def test_the_value_head_shares_one_pass_and_the_logits_are_the_policys(policy):
    model = PolicyWithValue(policy)
    ids = torch.randint(0, 40, (3, 9))
    logits, values = model(ids)
    assert torch.equal(logits, policy(ids))
    assert values.shape == (3, 9) and values.dtype == torch.float32 and float(values.detach().abs().sum()) == 0.0
    values.sum().backward()  # the zero head still gets a gradient: the hidden states
    assert float(model.value_head.weight.grad.abs().sum()) > 0


def test_ppo_loss_at_the_rollouts_own_policy_is_minus_the_mean_advantage_plus_the_value_loss(policy):
    """With old log-probs equal to the current ones, every ratio is 1: the policy loss is -mean(A) over the reply
    tokens and the value loss 0.5 mean((V - R)^2); the gradient of the policy part is the policy gradient."""
    from lmforge.align.rollout import logits_token_stats

    model = PolicyWithValue(policy)
    ids = torch.randint(0, 40, (2, 8))
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 3:7], labels[1, 3:5] = ids[0, 4:8], ids[1, 4:6]
    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        logits, _ = model(ids)
        old = logits_token_stats(logits, labels, 0.7)[0]
    adv = torch.randn(2, 8) * mask
    returns = torch.randn(2, 8) * mask
    batch = {"input_ids": ids, "labels": labels, "old_logps": old, "old_values": torch.zeros(2, 8), "advantages": adv,
             "returns": returns, "stats": {"reward": torch.tensor(0.25)}}  # fmt: skip
    loss, metrics = PPOLoss(temperature=0.7, cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)(model, batch)
    n = mask.sum()
    expected_vf = 0.5 * float((returns**2 * mask).sum() / n)  # values are 0 at the start
    assert float(loss) == pytest.approx(float(-(adv * mask).sum() / n) + 0.5 * expected_vf, abs=1e-6)
    assert float(metrics["value_loss"]) == pytest.approx(expected_vf, abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-10)
    assert float(metrics["reward"]) == 0.25
    assert 0 < float(metrics["entropy"]) <= math.log(40) + 1e-5
