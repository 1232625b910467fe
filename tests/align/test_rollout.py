"""Rollouts: rows and labels laid out exactly, the same replies for the same seed whatever other prompts share the
call, the stop token kept exactly when a reply ended, and token_logps scoring the distribution the sampler drew
from (checked against sampled frequencies)."""

import pytest
import torch
from helpers import make_chain, tiny_chat_model

from lmforge.align.rollout import prompt_seed, sample_rollout, token_logps
from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import generate
from lmforge.model.io import load_checkpoint_tokenizer, load_model
from lmforge.tokenizer import IGNORE_INDEX


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("rollout"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_checkpoint_tokenizer(ckpt)


@pytest.fixture()
def model(ckpt):
    return load_model(ckpt)[0]


def prompts(tok, texts=("Give three tips", "Name a color", "Write a list of new plants")):
    return [prompt_ids(tok, [Message("user", t)]) for t in texts]


def test_rows_and_labels_are_laid_out_exactly(model, tok):
    ps = prompts(tok)
    r = sample_rollout(model, tok, ps, [0, 1, 2], group_size=3, max_new_tokens=12, temperature=1.0, seed=5)
    assert r.ids.shape[0] == r.labels.shape[0] == 9 and r.ids.shape == r.labels.shape
    assert r.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    stop = tok.stop_ids
    for row in range(9):
        p, reply = ps[r.prompt_index[row]], r.replies[row]
        full = p + reply + ([stop[0]] if r.ended[row] else [])
        if r.ended[row]:  # the one stop token the reply ended with (the template's end of turn or EOS)
            full[-1] = int(r.ids[row, len(full) - 1])
            assert full[-1] in stop
        assert r.ids[row, : len(full)].tolist() == full
        assert (r.ids[row, len(full) :] == tok.pad_id).all()
        expected = [IGNORE_INDEX] * r.ids.shape[1]
        expected[len(p) - 1 : len(full) - 1] = full[len(p) :]
        assert r.labels[row].tolist() == expected
        assert r.texts[row] == tok.decode(reply, skip_special_tokens=True)
        assert len(reply) <= 12 and not set(reply) & set(stop)


def test_same_seed_same_replies_whatever_else_is_in_the_call(model, tok):
    ps = prompts(tok)
    alone = sample_rollout(model, tok, [ps[2]], [7], group_size=4, max_new_tokens=10, temperature=1.0, seed=11)
    shared = sample_rollout(model, tok, ps, [3, 5, 7], group_size=4, max_new_tokens=10, temperature=1.0, seed=11)
    assert shared.replies[8:] == alone.replies and shared.ended[8:] == alone.ended
    again = sample_rollout(model, tok, ps, [3, 5, 7], group_size=4, max_new_tokens=10, temperature=1.0, seed=11)
    assert torch.equal(again.ids, shared.ids)
    other = sample_rollout(model, tok, ps, [3, 5, 7], group_size=4, max_new_tokens=10, temperature=1.0, seed=12)
    assert other.replies != shared.replies
    assert len(set(map(tuple, shared.replies[:4]))) > 1  # the group's replies differ from each other
    assert prompt_seed(1, 2) != prompt_seed(2, 1) and 0 <= prompt_seed(1, 2) < 2**63


def test_stop_token_is_kept_exactly_when_the_reply_ended(model, tok):
    p = prompts(tok)[0]
    a, b, end = 40, 41, tok.stop_ids[0]
    make_chain(model, {p[-1]: a, a: b, b: end, end: a})
    r = sample_rollout(model, tok, [p], [0], group_size=2, max_new_tokens=5, temperature=1.0, seed=0)
    assert r.replies == [[a, b], [a, b]] and r.ended == [True, True]
    assert r.ids[0].tolist() == p + [a, b, end]
    assert r.labels[0].tolist() == [IGNORE_INDEX] * (len(p) - 1) + [a, b, end, IGNORE_INDEX]
    make_chain(model, {p[-1]: a, a: b, b: a})  # never ends: cut at the limit, no stop token
    r = sample_rollout(model, tok, [p], [0], group_size=2, max_new_tokens=5, temperature=1.0, seed=0)
    assert r.replies == [[a, b, a, b, a]] * 2 and r.ended == [False, False]
    assert r.ids[0].tolist() == p + [a, b, a, b, a]
    assert r.labels[0].tolist()[-1] == IGNORE_INDEX  # the last position scores nothing
    # The chain is near-certain: its reply's log-prob is ~0.
    assert token_logps(model, r.ids, r.labels, 1.0).sum(-1).abs().max() < 1e-3


def test_generate_include_stop_returns_the_stop_token_only_when_stopped(model, tok):
    p = prompts(tok)[0]
    a, end = 40, tok.stop_ids[0]
    make_chain(model, {p[-1]: a, a: end})
    assert generate(model, [p], 4, temperature=0.0, stop_ids=[end]) == [[a]]
    assert generate(model, [p], 4, temperature=0.0, stop_ids=[end], include_stop=True) == [[a, end]]
    assert generate(model, [p], 1, temperature=0.0, stop_ids=[end], include_stop=True) == [[a]]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_logps_score_the_sampling_distribution(model, tok, temperature):
    """The first reply token's sampled frequencies match exp(token_logps) at the same temperature."""
    p = prompts(tok)[1]
    n = 3000
    r = sample_rollout(model, tok, [p], [0], group_size=n, max_new_tokens=1, temperature=temperature, seed=3)
    first = r.ids[:, len(p)]
    with torch.no_grad():
        logps = token_logps(model, r.ids, r.labels, temperature)
        logits = model(r.ids[:1, : len(p)])[0, -1].float()
    probs = torch.softmax(logits / temperature, -1)
    assert torch.allclose(logps[:, len(p) - 1], probs[first].log(), atol=1e-5)
    assert (logps[:, : len(p) - 1] == 0).all() and (logps[:, len(p) :] == 0).all()
    freq = torch.bincount(first, minlength=probs.numel()).float() / n
    top = probs.argsort(descending=True)[:5]
    # Within ~4 standard errors of the expected frequency for the five likeliest tokens.
    se = (probs[top] * (1 - probs[top]) / n).sqrt()
    assert ((freq[top] - probs[top]).abs() <= 4 * se + 1e-3).all()
