"""N-gram speculative decoding: the drafts, how many stand, and an engine whose output drafts never change (stop
tokens, max_tokens and the cache included), with drafts all accepted, partly accepted and refused."""

from __future__ import annotations

import pytest
import torch

from helpers import make_chain
from lmforge.infer.batching import BatchEngine, SamplingParams, TokenEvent
from lmforge.infer.speculative import NgramIndex, accepted
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import train_tokenizer


def test_draft_follows_the_latest_earlier_occurrence_of_the_longest_suffix():
    idx = NgramIndex([1, 2, 3, 4, 1, 2, 5, 1, 2])
    # (5, 1, 2) never occurred before; (1, 2) last ended at index 5, followed by 5, 1, 2.
    assert idx.draft(2) == [5, 1]
    assert idx.draft(9) == [5, 1, 2]
    idx.extend([3])  # (1, 2, 3) ended at index 2 before: 4, 1, 2, 5, ...
    assert idx.draft(3) == [4, 1, 2]
    assert NgramIndex([7, 8, 9]).draft(4) == []  # nothing repeats
    assert idx.draft(0) == []
    built = NgramIndex([])
    built.extend([1, 2, 3, 4, 1, 2, 5, 1, 2, 3])
    assert built.draft(3) == idx.draft(3) and built.tokens == idx.tokens


def test_accepted_counts_the_agreeing_prefix():
    assert accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted([4, 5, 6], [3, 5, 6, 7]) == 0
    assert accepted([], [3]) == 0


@pytest.fixture(scope="module")
def chain_model():
    """A model whose greedy choice after 10, 11, 12, 13 is the next of them in a loop (others: token 0's row)."""
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 30, vocab_size=120)
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8,
                     mlp_hidden=64, max_seq_len=40, init_std=0.5)  # fmt: skip
    return make_chain(Transformer(args).eval(), {10: 11, 11: 12, 12: 13, 13: 10}), tok


def run(engine: BatchEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
    handle = engine.submit(prompt, params)
    while not handle.finished.is_set():
        engine._step()
    events = list(handle)
    return [e.token_id for e in events if isinstance(e, TokenEvent)], events[-1].finish_reason


@pytest.mark.parametrize(
    ("prompt", "params", "all_accepted"),
    [
        ([0, 10, 11, 12, 13, 10], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), True),
        # "10" was last followed by 11, 20, 21: the first drafted token stands, the second does not.
        ([0, 10, 11, 20, 21, 10], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), False),
        # A stop token inside an accepted run ends the request there.
        ([0, 10, 11, 12, 13, 10], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[13]), True),
        # The context (40) ends the request mid-draft: "length" after exactly the room left.
        ([0, *[10, 11, 12, 13] * 8, 10], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), True),
    ],
)
def test_drafts_never_change_the_output(chain_model, prompt, params, all_accepted):
    model, tok = chain_model
    plain = BatchEngine(model, tok, max_batch=2)
    drafting = BatchEngine(model, tok, max_batch=2, draft=4)
    want = run(plain, prompt, params)
    assert run(drafting, prompt, params) == want
    stats = drafting.stats
    assert stats["draft_tokens"] > 0 and stats["tokens_generated"] == len(want[0])
    assert (stats["draft_tokens_accepted"] == stats["draft_tokens"]) == all_accepted
    assert stats["steps"] < plain.stats["steps"]  # fewer forwards for the same tokens
    # The next request reuses the stored sequence as a prefix, so the cache must hold exactly the fed tokens.
    assert run(drafting, prompt, params) == want


def test_a_random_model_refuses_drafts_and_keeps_its_output():
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 30, vocab_size=120)
    torch.manual_seed(1)
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                     mlp_hidden=64, max_seq_len=64, init_std=0.3)  # fmt: skip
    model = Transformer(args).eval()
    prompt = [0, *[5, 6, 7, 8] * 4]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    drafting = BatchEngine(model, tok, max_batch=2, draft=3)
    assert run(drafting, prompt, params) == run(BatchEngine(model, tok, max_batch=2), prompt, params)
    assert drafting.stats["draft_tokens"] > 0


def test_only_plain_greedy_requests_draft(chain_model):
    model, tok = chain_model
    engine = BatchEngine(model, tok, max_batch=2, draft=4)
    run(engine, [0, 10, 11, 12, 13, 10], SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True))
    run(engine, [0, 10, 11, 12, 13, 10], SamplingParams(max_tokens=6, temperature=0, logprobs=True))
    assert engine.stats["draft_tokens"] == 0
    with pytest.raises(ValueError, match="draft=-1"):
        BatchEngine(model, tok, draft=-1)
