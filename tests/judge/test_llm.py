"""The LLM judge: exact choice-token probabilities against a manual forward, both orders, order-swap symmetry,
ties on disagreement, the position-bias rate, replies cut to fit the context."""

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_chat_model, tiny_hf_chat_model

from lmforge.finetune.data import Message
from lmforge.judge.base import JudgeItem, Verdict, position_bias_rate
from lmforge.judge.llm import LLMJudge, choice_token_ids, decide, judging_message, question_text
from lmforge.model.io import load_checkpoint_tokenizer, load_model

Q = [Message("user", "The capital of France?")]  # short: the tiny model's context is 128 tokens
A, B = "Paris.", "Lyon, I think."


@pytest.fixture(scope="module", params=["lmforge", "hf"])
def checkpoint(request, tmp_path_factory):
    """A tiny lmforge checkpoint (its own template) and a tiny Hugging Face model (a ChatML Jinja template)."""
    root = tmp_path_factory.mktemp(request.param)
    return tiny_chat_model(root) if request.param == "lmforge" else tiny_hf_chat_model(root / "hf")


def manual_logprobs(checkpoint, instruction, prompt, first, second):
    """log P(first token of "A"), log P(first token of "B") at the first reply position, one sequence alone."""
    model, _ = load_model(checkpoint, "cpu", dtype=torch.float32)
    tok = load_checkpoint_tokenizer(checkpoint)
    text = judging_message(instruction, question_text(prompt), first, second)
    ids = tok.chat_template.prompt_ids([Message("user", text)])
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids]))[0, -1].double()
    logp = torch.log_softmax(logits, -1)
    a_id, b_id = tok.encode("A")[0], tok.encode("B")[0]
    return [float(logp[a_id]), float(logp[b_id])]


def test_choice_probabilities_match_a_manual_forward_in_both_orders(checkpoint):
    judge = LLMJudge.from_checkpoint(checkpoint, "Pick the correct reply.", device="cpu", batch_size=4)
    other = [Message("user", "A fruit?"), Message("assistant", "Apple."), Message("user", "Another?")]
    items = [JudgeItem(Q, A, B), JudgeItem(other, "A pear.", "A banana, yellow.")]
    verdicts = judge.compare_many(items)  # two items of different lengths: four right-padded rows in one forward
    for item, verdict in zip(items, verdicts):
        assert "truncated" not in verdict.detail
        first = manual_logprobs(checkpoint, "Pick the correct reply.", item.prompt, item.a, item.b)
        second = manual_logprobs(checkpoint, "Pick the correct reply.", item.prompt, item.b, item.a)
        assert verdict.detail["logprobs_first"] == pytest.approx(first, abs=1e-5)
        assert verdict.detail["logprobs_second"] == pytest.approx(second, abs=1e-5)
        p_first = 1 / (1 + torch.exp(torch.tensor(first[1] - first[0]))).item()
        p_second = 1 / (1 + torch.exp(torch.tensor(second[0] - second[1]))).item()
        assert verdict.p_a_first == pytest.approx(p_first, abs=1e-5)
        assert verdict.p_a_second == pytest.approx(p_second, abs=1e-5)
        assert verdict.detail["p_a"] == pytest.approx((p_first + p_second) / 2, abs=1e-5)
        agree = (p_first > 0.5) == (p_second > 0.5)
        assert verdict.choice == (("a" if p_first > 0.5 else "b") if agree else "tie")
    # The batch does not change a verdict: each item alone gives the same probabilities.
    alone = judge.compare(other, items[1].a, items[1].b)
    assert alone.p_a_first == pytest.approx(verdicts[1].p_a_first, abs=1e-5)


def test_swapping_the_replies_mirrors_the_verdict(checkpoint):
    judge = LLMJudge.from_checkpoint(checkpoint, "Which is better?", device="cpu")
    replies = ["Yes.", "No, it is not.", "def f(x):\n    return x", "The answer is 42.", "Paris."]
    items = [JudgeItem(Q, a, b) for a in replies for b in replies if a != b]
    forward = judge.compare_many(items)
    backward = judge.compare_many([JudgeItem(it.prompt, it.b, it.a) for it in items])
    mirror = {"a": "b", "b": "a", "tie": "tie"}
    for f, b in zip(forward, backward):
        assert b.choice == mirror[f.choice]
        assert b.p_a_first == pytest.approx(1 - f.p_a_second, abs=1e-5)
        assert b.p_a_second == pytest.approx(1 - f.p_a_first, abs=1e-5)


def test_orders_that_agree_decide_and_orders_that_disagree_tie():
    # a shown first: P(A) > P(B); a shown second: P(B) > P(A): both orders prefer a.
    assert decide([-0.1, -2.0], [-3.0, -0.2]).choice == "a"
    assert decide([-2.0, -0.1], [-0.2, -3.0]).choice == "b"
    # "A" wins in both orders: the position decided, not the replies.
    v = decide([-0.1, -2.0], [-0.1, -2.0])
    assert v.choice == "tie" and v.p_a_first > 0.5 > v.p_a_second
    assert v.detail["p_a"] == pytest.approx(0.5)


def test_position_bias_rate_counts_the_items_where_one_position_won_both_times():
    first_always = decide([-0.1, -2.0], [-0.1, -2.0])  # "A" both times
    second_always = decide([-2.0, -0.5], [-2.0, -0.5])  # "B" both times
    consistent = [decide([-0.1, -2.0], [-3.0, -0.2]), decide([-2.0, -0.1], [-0.2, -3.0])]
    assert position_bias_rate([first_always, second_always, *consistent]) == 0.5
    assert position_bias_rate(consistent) == 0.0
    assert position_bias_rate([Verdict("a", {"scores": [1.0, 0.0]})]) is None  # no orders: not an LLM judge


def test_long_replies_are_cut_to_fit_and_counted_the_question_never(tmp_path):
    judge = LLMJudge.from_checkpoint(tiny_chat_model(tmp_path), "Compare.", device="cpu")
    long_a, long_b = "the cat sat on the mat " * 40, "a dog ran"
    verdict = judge.compare(Q, long_a, long_b)
    assert verdict.detail["truncated"] is True and judge.truncated == 1
    assert 0 < verdict.p_a_first < 1
    fitted = judge._rows(JudgeItem(Q, long_a, long_b))
    assert max(len(fitted[0]), len(fitted[1])) <= judge.max_len
    assert Q[0].content in judge.tok.decode(fitted[0])  # the question is whole
    assert "Reply B:\na dog ran\n" in judge.tok.decode(fitted[0])  # the short reply is whole: the long one is cut first
    too_long = judge.compare([Message("user", "why " * 300)], "x", "y")
    assert too_long.choice == "tie" and too_long.skipped.startswith("prompt too long")
    assert judge.truncated == 1


def test_choice_tokens_that_do_not_differ_are_refused_naming_the_tokenizer():
    same = SimpleNamespace(encode=lambda text: [7], imported=SimpleNamespace(source="/models/odd"))
    with pytest.raises(ValueError, match=r"/models/odd.*must exist and differ"):
        choice_token_ids(same)


def test_the_judge_leaves_a_training_model_in_training_mode(tmp_path):
    model, _ = load_model(tiny_chat_model(tmp_path), "cpu", dtype=torch.float32)
    tok = load_checkpoint_tokenizer(tmp_path / "ckpt")
    judge = LLMJudge(model.train(), tok, "Compare.")
    verdict = judge.compare(Q, A, B)  # dropout-free model: eval mode changes nothing but must be restored
    assert model.training and 0 < verdict.p_a_first < 1
