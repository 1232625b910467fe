"""The reward-model judge (scores as score_conversations gives them, position bias 0, the tie margin) and the
verifier judge (GSM8K answers, MBPP tests on real MBPP items in the sandbox, items without a reference skipped)."""

import json

import pytest
import torch
from helpers import tiny_chat_model

from lmforge.align.prompts import read_prompts
from lmforge.align.reward_model import RewardModel, score_conversations
from lmforge.finetune.data import Message
from lmforge.judge.base import JudgeItem, LengthJudge, position_bias_rate
from lmforge.judge.reward import RewardJudge
from lmforge.judge.verifier import VerifierJudge
from lmforge.model.io import load_checkpoint_tokenizer

MBPP = "/work/shared/data/code/mbpp.jsonl"
Q = [Message("user", "Say something.")]
REPLIES = ["Hello there.", "No.", "A longer reply about cats and dogs.", "Yes, certainly."]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    ckpt = tiny_chat_model(root)
    torch.manual_seed(1)
    return RewardModel.from_checkpoint(ckpt).save(root / "rm", tokenizer_dir=ckpt)


def test_reward_judge_compares_the_scores_score_conversations_gives(reward_dir):
    judge = RewardJudge.from_dir(reward_dir, device="cpu")
    items = [JudgeItem(Q, a, b) for a in REPLIES for b in REPLIES if a != b]
    verdicts = judge.compare_many(items)
    scores, index, _ = score_conversations(judge.rm, load_checkpoint_tokenizer(reward_dir),
                                           [[*Q, Message("assistant", r)] for r in REPLIES])  # fmt: skip
    by_reply = dict(zip([REPLIES[i] for i in index], scores.tolist()))
    for item, verdict in zip(items, verdicts):
        a, b = by_reply[item.a], by_reply[item.b]
        assert verdict.detail["scores"] == pytest.approx([a, b], abs=1e-6)
        assert verdict.choice == ("a" if a > b else "b")
    # Each reply is scored alone: swapping them swaps the scores and the winner, so no position is favoured.
    swapped = judge.compare_many([JudgeItem(it.prompt, it.b, it.a) for it in items])
    mirror = {"a": "b", "b": "a", "tie": "tie"}
    assert [v.choice for v in swapped] == [mirror[v.choice] for v in verdicts]
    assert position_bias_rate(verdicts) is None  # no orders to disagree: 0 by construction, not measured


def test_reward_judge_tie_margin_and_unscorable_items(reward_dir):
    wide = RewardJudge.from_dir(reward_dir, tie_margin=1e6, device="cpu")
    assert {v.choice for v in wide.compare_many([(Q, a, b) for a in REPLIES for b in REPLIES if a != b])} == {"tie"}
    long_prompt = [Message("user", "word " * 400)]  # the tiny model's context is 128 tokens
    verdict = RewardJudge.from_dir(reward_dir, device="cpu").compare_many([JudgeItem(long_prompt, "a", "b")])[0]
    assert verdict.choice == "tie" and verdict.skipped.startswith("prompt too long")


def test_length_judge_prefers_the_longer_reply():
    verdicts = LengthJudge().compare_many([(Q, "abc", "ab"), (Q, "a", "abcd"), (Q, "ab", "cd")])
    assert [v.choice for v in verdicts] == ["a", "b", "tie"]
    assert verdicts[1].detail == {"lengths": [1, 4]}


def test_verifier_judge_gsm8k_answer():
    judge = VerifierJudge("gsm8k_answer")
    items = [JudgeItem(Q, "6 * 7 = 42. The answer is 42.", "The answer is 41.", "42"),
             JudgeItem(Q, "It is 40.", "#### 42", "42"), JudgeItem(Q, "42", "so 42", "42"),
             JudgeItem(Q, "42", "41")]  # no reference: skipped, not scored 0
    verdicts = judge.compare_many(items)
    assert [v.choice for v in verdicts] == ["a", "b", "tie", "tie"]
    assert verdicts[0].detail == {"rewards": [1.0, 0.0]}
    assert verdicts[3].skipped.startswith("no reference") and "'answer'" in verdicts[3].skipped


def test_verifier_judge_runs_real_mbpp_tests_in_the_sandbox():
    prompts, _ = read_prompts(MBPP, limit=3)
    judge = VerifierJudge("mbpp_tests", timeout_s=5.0)
    items = []
    for p in prompts:
        tests = "\n".join(p.meta["tests"])
        correct = f"```python\n{p.meta['reference']}\n```"
        wrong = f"```python\ndef {p.meta['entry_point']}(*args):\n    return None\n```"
        items.append(JudgeItem(p.messages, correct, wrong, tests))
        # a reference that is a JSON object fills the meta as it is (tests and their setup)
        items.append(JudgeItem(p.messages, wrong, correct, json.dumps({"tests": p.meta["tests"],
                                                                       "test_setup": p.meta["test_setup"]})))
    verdicts = judge.compare_many(items)
    assert [v.choice for v in verdicts] == ["a", "b"] * 3
    assert all(sorted(v.detail["rewards"]) == [0.0, 1.0] for v in verdicts)


def test_unknown_verifier_is_refused_with_the_names():
    with pytest.raises(ValueError, match="unknown verifier 'length'.*gsm8k_answer"):
        VerifierJudge("length")
