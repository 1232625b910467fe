"""GRPO: group advantages and the clipped token-level loss by hand, the reward of a toy task rising, rollouts re-used
over `iterations` steps, a crashed run resuming bit for bit (sampling included), the guard stopping (or warning
about) a KL past grpo.max_kl, and the KL exactly 0 while the policy is the reference."""

import json
import logging
import math

import pytest
import torch
from helpers import tiny_chat_model
from safetensors.torch import load_file
from torch import nn

from lmforge.align import grpo as grpo_module
from lmforge.align.guards import AlignmentDiverged, RLGuard
from lmforge.align.grpo import group_advantages, grpo_loss, train_grpo
from lmforge.align.prompts import PromptItem
from lmforge.finetune.data import Message
from lmforge.losses import LossContext
from lmforge.train.config import TrainConfig

I = -100  # noqa: E741  (IGNORE_INDEX)
WORDS = ["Give three tips", "Name a color", "Write a list", "Describe water", "Make a plan", "Explain time",
         "List plants", "Say hello"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("grpo"))


def items(n=len(WORDS)):
    return [PromptItem([Message("user", w)], {"id": str(i)}) for i, w in enumerate(WORDS[:n])]


def e_share(samples):
    """A dense toy reward: the share of the reply's characters that are the letter e."""
    values = [sum(c == "e" for c in s.completion) / max(len(s.completion), 1) for s in samples]
    return values, {"e": values}


def cfg(**kw):
    base = {"seq_len": 128, "batch_size": 2, "max_steps": 4, "lr": 0.03, "warmup_steps": 0, "weight_decay": 0.0,
            "compile": False, "eval_every": 100, "ckpt_every": 100, "threads": 1}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def run(ckpt, out, train, **kw):
    options = {"group_size": 4, "max_new_tokens": 6, "temperature": 1.0, "seed": 0, **kw}
    return train_grpo(ckpt, items(), items(3), e_share, out, train, **options)


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_group_advantages_exact():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # the sample standard deviation of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert group_advantages(rewards, 4, scale_rewards=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    assert group_advantages(rewards, 2, scale_rewards=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(rewards, 3)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, ids):
        return self.logits


def by_hand_batch():
    ln = math.log
    logits = torch.zeros(2, 3, 2)
    logits[0, 1] = torch.tensor([0.0, ln(3)])  # p(1) = 3/4
    logits[1, 1] = torch.tensor([ln(4), 0.0])  # p(0) = 4/5
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([[I, 1, 0], [I, 0, I]]),
             "old_logps": torch.tensor([[0.0, ln(0.5), ln(0.5)], [0.0, ln(0.5), 0.0]]),
             "ref_logps": torch.tensor([[0.0, ln(0.5), ln(0.5)], [0.0, ln(0.5), 0.0]]),
             "advantages": torch.tensor([1.0, -2.0]), "rewards": torch.tensor([3.0, 1.0]),
             "lengths": torch.tensor([2.0, 1.0]), "ended": torch.tensor([1.0, 0.0]),
             "reward/e": torch.tensor([0.5, 0.25])}  # fmt: skip
    return FixedLogits(logits), batch


def test_grpo_loss_by_hand():
    ln = math.log
    model, batch = by_hand_batch()
    # ratios 1.5 (A=1: clipped to 1.2 wins the min), 1.0 (A=1), 1.6 (A=-2: the unclipped -3.2 is the min)
    policy_terms = -1.2 - 1.0 + 3.2
    k3 = lambda ratio: ratio - ln(ratio) - 1  # noqa: E731  exp(ref - logp) - (ref - logp) - 1
    kls = [k3(0.5 / 0.75), 0.0, k3(0.5 / 0.8)]
    entropy = [-(0.25 * ln(0.25) + 0.75 * ln(0.75)), ln(2), -(0.8 * ln(0.8) + 0.2 * ln(0.2))]
    loss, m = grpo_loss(model, batch, epsilon=0.2, beta=0.1)
    assert loss.item() == pytest.approx((policy_terms + 0.1 * sum(kls)) / 3, abs=1e-6)
    assert m["kl"].item() == pytest.approx(sum(kls) / 3, abs=1e-6)
    assert m["entropy"].item() == pytest.approx(sum(entropy) / 3, abs=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(1 / 3)
    assert (m["reward"].item(), m["reward/e"].item(), m["response_length"].item(), m["ended_turn"].item()) == (
        2.0, 0.375, 1.5, 0.5)
    # The step's share: 6 reply tokens in the whole step, this micro-batch's 3 of them.
    shared, _ = grpo_loss(model, batch, LossContext(tokens=6, parts=2), epsilon=0.2, beta=0.1)
    assert shared.item() == pytest.approx(loss.item() / 2, abs=1e-6)
    # Without KL the clipped token gets no gradient; the others do.
    loss, _ = grpo_loss(model, batch, epsilon=0.2, beta=0.0)
    assert loss.item() == pytest.approx(policy_terms / 3, abs=1e-6)
    loss.backward()
    grad = model.logits.grad
    assert torch.equal(grad[0, 1], torch.zeros(2)) and grad[0, 2].abs().sum() > 0 and grad[1, 1].abs().sum() > 0
    assert torch.equal(grad[:, 0], torch.zeros(2, 2))  # prompt positions train nothing


def test_grpo_raises_a_toy_reward_within_bounded_steps(ckpt, tmp_path):
    result = run(ckpt, tmp_path / "out", cfg(max_steps=12, batch_size=4))
    rewards = [r["reward"] for r in records(tmp_path / "out")]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > 1.5 * first, rewards
    final = result["final_eval_metrics"]
    assert set(final) == {"heldout_reward", "heldout_response_length"} and 0 <= final["heldout_response_length"] <= 6
    assert result["prompts"] == 8 and result["heldout_prompts"] == 3 and result["reference"] is False
    assert set(records(tmp_path / "out")[0]) >= {"reward", "reward/e", "entropy", "response_length", "ended_turn",
                                                  "clip_fraction"}  # fmt: skip


def test_iterations_reuse_each_rollout_and_only_then_clip(ckpt, tmp_path):
    run(ckpt, tmp_path / "out", cfg(max_steps=4, lr=0.05), iterations=2, epsilon=0.05)
    recs = records(tmp_path / "out")
    assert recs[0]["reward"] == recs[1]["reward"] and recs[2]["reward"] == recs[3]["reward"]
    assert recs[0]["response_length"] == recs[1]["response_length"] and recs[0]["reward"] != recs[2]["reward"]
    assert recs[0]["clip_fraction"] == 0.0 and recs[2]["clip_fraction"] == 0.0  # a fresh rollout: ratio 1
    assert recs[1]["clip_fraction"] > 0 or recs[3]["clip_fraction"] > 0


def test_a_crashed_run_resumes_to_the_uninterrupted_weights(ckpt, tmp_path, monkeypatch):
    """A crash in step 5, after the step-3 checkpoint taken half-way through a re-used rollout: the same call
    resumes with that pending rollout and the sampling state, ending with the uninterrupted run's weights."""
    train = cfg(max_steps=6, ckpt_every=3, lr=0.05)
    reference = run(ckpt, tmp_path / "reference", train, iterations=2, beta=0.05)
    real, calls = grpo_module.grpo_loss, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(ckpt, tmp_path / "crashed", train, iterations=2, beta=0.05)
    monkeypatch.setattr(grpo_module, "grpo_loss", real)
    state = json.loads((tmp_path / "crashed" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert "pending" in json.dumps(state)  # the rollout of steps 3-4, drawn by the step-2 weights
    resumed = run(ckpt, tmp_path / "crashed", train, iterations=2, beta=0.05)
    assert resumed["resumed_from"] == 3
    a, b = (load_file(str(tmp_path / d / "final/model.safetensors")) for d in ("reference", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "reference")[-1] == {**records(tmp_path / "crashed")[-1],
                                                   "tokens_per_s": records(tmp_path / "reference")[-1]["tokens_per_s"],
                                                   "mfu": records(tmp_path / "reference")[-1]["mfu"]}  # fmt: skip
    assert reference["final_eval_metrics"] == resumed["final_eval_metrics"]


def test_guard_stops_a_kl_past_max_kl_and_kl_is_zero_while_policy_is_reference(ckpt, tmp_path):
    guard = RLGuard("grpo", max_kl=1e-6)
    with pytest.raises(AlignmentDiverged, match=r"step 2: kl .* exceeds grpo\.max_kl=1e-06"):
        run(ckpt, tmp_path / "stop", cfg(max_steps=4, lr=0.05), guard=guard)
    first = records(tmp_path / "stop")
    assert len(first) == 1 and first[0]["kl"] == 0.0  # step 1: the policy is still the reference


def test_guard_with_on_blowup_warn_only_warns(ckpt, tmp_path, caplog):
    guard = RLGuard("grpo", max_kl=1e-6, on_blowup="warn")
    with caplog.at_level(logging.WARNING, logger="lmforge.align.guards"):
        result = run(ckpt, tmp_path / "warn", cfg(max_steps=3, lr=0.05), guard=guard)
    assert result["steps"] == 3 and result["reference"] is True
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("exceeds grpo.max_kl=1e-06" in s and "training goes on" in s for s in said)
