"""The reward model: save/load round trip, scores independent of padding and batch, a toy preference task learned
with the Bradley-Terry loss, pairwise accuracy with its Wilson interval, and the longer-answer baseline."""

import json
import random

import pytest
import torch
from helpers import tiny_chat_model

from lmforge.align.losses import bradley_terry_loss
from lmforge.align.preferences import PreferencePair, render_pair
from lmforge.align.reward_model import (HEAD_WEIGHTS, META, RewardModel, load_reward_model, longer_answer_baseline,
                                        pairwise_accuracy, score_conversations, score_ids, score_pairs)  # fmt: skip
from lmforge.finetune.classify import right_pad
from lmforge.finetune.data import Message
from lmforge.model.io import load_checkpoint_tokenizer, load_model

WORDS = ["the", "water", "is", "good", "for", "people", "and", "plants", "time", "list", "make", "three", "new"]
MARK = "sun"  # chosen replies contain it, rejected ones do not


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_checkpoint_tokenizer(ckpt)


def fresh_rm(ckpt, seed=0):
    torch.manual_seed(seed)
    return RewardModel.from_checkpoint(ckpt)


def toy_pairs(n, seed):
    """Pairs whose replies have the same number of words; the chosen one has MARK in a random place."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        k = rng.randint(3, 8)
        rejected = [rng.choice(WORDS) for _ in range(k)]
        chosen = [rng.choice(WORDS) for _ in range(k - 1)]
        chosen.insert(rng.randint(0, k - 1), MARK)
        prompt = [Message("user", " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))))]
        pairs.append(PreferencePair(prompt, " ".join(chosen), " ".join(rejected), source=f"toy[{i}]"))
    return pairs


def test_save_load_round_trip_is_bit_identical(ckpt, tok, tmp_path):
    rm = fresh_rm(ckpt)
    pairs = toy_pairs(6, seed=1)
    before = score_pairs(rm, tok, pairs, batch_size=4)
    out = rm.save(tmp_path / "reward", tokenizer_dir=ckpt)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [HEAD_WEIGHTS, META, "model.json", "model.safetensors", "tokenizer.json"])
    meta = json.loads((out / META).read_text())
    assert meta == {"format": 1, "pooling": "last", "d_model": 64, "base_checkpoint": str(ckpt.resolve())}
    loaded = load_reward_model(out)
    after = score_pairs(loaded, load_checkpoint_tokenizer(out), pairs, batch_size=4)
    assert torch.equal(before.chosen, after.chosen) and torch.equal(before.rejected, after.rejected)
    assert not loaded.training
    load_model(out)  # the folder is also a plain checkpoint of the backbone
    (out / META).write_text(json.dumps({**meta, "format": 9}))
    with pytest.raises(ValueError, match="format 9"):
        load_reward_model(out)
    with pytest.raises(FileNotFoundError, match="not a reward model folder"):
        load_reward_model(ckpt)


def test_score_does_not_depend_on_padding_or_batch(ckpt, tok):
    rm = fresh_rm(ckpt).eval()
    rendered = [render_pair(tok, p, 128) for p in toy_pairs(5, seed=2)]
    seqs = [r.chosen_ids for r in rendered] + [r.rejected_ids for r in rendered]
    alone = torch.stack([score_ids(rm, [s], tok.pad_id, batch_size=1)[0] for s in seqs])
    together = score_ids(rm, seqs, tok.pad_id, batch_size=len(seqs))
    assert torch.allclose(alone, together, rtol=0, atol=1e-6)
    # and through forward directly with extra padding beyond the longest sequence
    batch, lengths = right_pad(seqs, tok.pad_id)
    wide = torch.cat([batch, torch.full((len(seqs), 7), tok.pad_id)], dim=1)
    with torch.no_grad():
        assert torch.allclose(rm(wide, lengths), alone, rtol=0, atol=1e-6)
    assert alone.std() > 0  # the scores are not all one constant


def test_score_conversations_matches_score_pairs(ckpt, tok):
    rm = fresh_rm(ckpt)
    pairs = toy_pairs(4, seed=3)
    scored = score_pairs(rm, tok, pairs)
    conversations = [[*p.prompt, Message("assistant", p.chosen)] for p in pairs] + [[Message("user", "hi")]]
    scores, index, skipped = score_conversations(rm, tok, conversations)
    assert index == [0, 1, 2, 3] and skipped.by_reason == {"no reply": 1}
    assert torch.allclose(scores, scored.chosen, rtol=0, atol=1e-6)


def test_bradley_terry_training_learns_the_toy_preference(ckpt, tok):
    rm = fresh_rm(ckpt)
    train, held_out = toy_pairs(96, seed=10), toy_pairs(64, seed=11)
    before = score_pairs(rm, tok, held_out)
    acc_before = pairwise_accuracy(before.chosen, before.rejected)["value"]
    rendered = [render_pair(tok, p, 128) for p in train]
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    rm.train()
    for _ in range(40):
        batch = rng.sample(rendered, 16)
        ids, lengths = right_pad([r.chosen_ids for r in batch] + [r.rejected_ids for r in batch], tok.pad_id)
        scores = rm(ids, lengths)
        loss, metrics = bradley_terry_loss(scores[:16], scores[16:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = score_pairs(rm, tok, held_out)
    acc_after = pairwise_accuracy(after.chosen, after.rejected)
    assert 0.25 < acc_before < 0.75, acc_before
    assert acc_after["value"] > 0.9, acc_after
    assert acc_after["n"] == 64


def test_pairwise_accuracy_and_wilson_interval():
    # correct, wrong, tie (half), correct: 2.5 of 4
    acc = pairwise_accuracy(torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 2.0, 0.0]))
    assert acc["value"] == 0.625 and acc["n"] == 4
    # Wilson, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    assert acc["ci95"] == pytest.approx([0.219428, 0.908102], abs=1e-5)
    everything = pairwise_accuracy(torch.ones(10), torch.zeros(10))
    assert everything["value"] == 1.0 and everything["ci95"] == pytest.approx([0.722467, 1.0], abs=1e-5)


def test_longer_answer_baseline_on_constructed_pairs(ckpt, tok):
    prompt = [Message("user", "Say something.")]
    pairs = [PreferencePair(prompt, "the water is good for people", "the water"),  # chosen longer: right
             PreferencePair(prompt, "good time", "make three new plants and time"),  # chosen shorter: wrong
             PreferencePair(prompt, "is water good", "is good water"),  # the same tokens: a tie, half
             PreferencePair(prompt, "make a list of three new plants", "people")]  # right
    scored = score_pairs(fresh_rm(ckpt), tok, pairs)
    diff = (scored.chosen_tokens - scored.rejected_tokens).tolist()
    assert [d > 0 for d in diff] == [True, False, False, True] and diff[2] == 0
    base = longer_answer_baseline(scored.chosen_tokens, scored.rejected_tokens)
    assert base["value"] == 0.625 and base["ci95"] == pytest.approx([0.219428, 0.908102], abs=1e-5)


def test_unrenderable_pair_is_skipped_and_counted(ckpt, tok):
    long_prompt = [Message("user", " ".join(["water"] * 200))]
    pairs = [*toy_pairs(2, seed=4), PreferencePair(long_prompt, "sun", "the", source="f.jsonl:7")]
    scored = score_pairs(fresh_rm(ckpt), tok, pairs)
    assert scored.index == [0, 1] and len(scored.chosen) == 2
    assert scored.skipped.count == 1 and scored.skipped.examples[0].startswith("f.jsonl:7: prompt too long")
