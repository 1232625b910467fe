"""The continuous-batching engine: per-row cache positions, parity with `generate`, per-request seeds, sampling
parameters on constructed logits, stop strings, cancellation, logprobs and the threaded API."""

from __future__ import annotations

import asyncio
import sysconfig
from pathlib import Path

import pytest
import torch

from helpers import make_chain
from lmforge.infer.batching import BatchEngine, Finished, SamplingParams, TokenEvent
from lmforge.infer.engine import generate
from lmforge.infer.sampling import StopText, pick, sampling_logits
from lmforge.model.kv_cache import SlotKVCache
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:8]
    texts = [f.read_text(encoding="utf-8") for f in files]
    return train_tokenizer(texts + ["héllo wörld, café naïve"] * 3, vocab_size=400)


def make_model(vocab_size: int, seed: int = 0, **kw) -> Transformer:
    base = dict(vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=64,
                max_seq_len=64, init_std=0.2)
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**(base | kw))).eval()


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[0, *torch.randint(5, vocab, (3 + 2 * i,), generator=g).tolist()] for i in range(n)]


def run(engine: BatchEngine, handles) -> list[list]:
    """Step an unstarted engine until every handle has finished; each handle's events."""
    while not all(h.finished.is_set() for h in handles):
        engine._step()
    return [list(h) for h in handles]


def tokens_of(events: list, stops) -> list[int]:
    ids = [e.token_id for e in events if isinstance(e, TokenEvent)]
    return ids[:-1] if ids and ids[-1] in stops else ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_slot_cache_rows_at_their_own_positions_match_full_forwards(arch: str):
    kw = dict(arch="gpt2", mlp="gelu", tie_embeddings=True) if arch == "gpt2" else {}
    m = make_model(97, **kw)
    seqs = [torch.randint(0, 97, (n,)) for n in (9, 4, 12)]
    cache = SlotKVCache.for_model(m, slots=4, max_len=16)
    with torch.no_grad():
        full = [m(s[None])[0] for s in seqs]
        for slot, s in zip((2, 0, 1), seqs, strict=True):  # prefill each row alone, all but its last 2 tokens
            m(s[None, :-2], cache=cache.use([slot]))
        # Two decode steps of all rows together, each row at its own position; slots out of order are gathered.
        for back in (2, 1):
            step = torch.stack([s[-back] for s in seqs])[:, None]
            out = m(step, cache=cache.use([2, 0, 1]))[:, 0]
            for row, s in enumerate(seqs):
                torch.testing.assert_close(out[row], full[row][len(s) - back], rtol=0, atol=1e-5)
    assert cache.lens == [4, 12, 9, 0]
    cache.move(1, 3)
    assert cache.lens[3] == 12 and torch.equal(cache.k[0][3, :, :12], cache.k[0][1, :, :12])


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_greedy_equals_generate_alone_one_and_eight_joining_midway(tok: Tokenizer, prefix_cache: bool):
    m = make_model(tok.vocab_size)
    ps = prompts(8, tok.vocab_size)
    stops = set(tok.stop_ids)
    alone = [generate(m, [p], 12, temperature=0, stop_ids=stops)[0] for p in ps]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    engine = BatchEngine(m, tok, max_batch=8, prefix_cache=prefix_cache)
    assert tokens_of(run(engine, [engine.submit(ps[0], greedy)])[0], stops) == alone[0]
    first = [engine.submit(p, greedy) for p in ps[:3]]
    for _ in range(4):  # three requests are mid-way when five more join
        engine._step()
    assert engine.stats["running"] == 3
    later = [engine.submit(p, greedy) for p in ps[3:]]
    events = run(engine, first + later)
    assert [tokens_of(ev, stops) for ev in events] == alone
    assert engine.stats["running"] == 0 and engine.stats["requests_finished"] == 9
    # With the cache, ps[0]'s second run reuses all but its last token (3 of 4); every other prompt shares token 0.
    assert engine.stats["prefix_tokens_reused"] == (3 + 7 if prefix_cache else 0)


def test_prefix_cache_skips_a_known_start_and_keeps_the_output(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    stops = set(tok.stop_ids)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = BatchEngine(m, tok, max_batch=2)
    first = prompts(1, tok.vocab_size)[0] + [40, 41, 42, 43]
    reply = [e.token_id for e in run(engine, [engine.submit(first, greedy)])[0][:-1]]
    # A chat's next turn: the conversation so far (prompt and all but the last reply token were fed) plus more.
    turn = first + reply + [50, 51]
    done = run(engine, [engine.submit(turn, greedy)])[0]
    assert engine.stats["prefix_tokens_reused"] == len(first) + len(reply) - 1
    assert tokens_of(done, stops) == generate(m, [turn], 6, temperature=0)[0]
    # A prompt equal to a stored sequence still runs its last token; one sharing nothing reuses nothing.
    before = engine.stats["prefix_tokens_reused"]
    run(engine, [engine.submit(first, greedy)])
    assert engine.stats["prefix_tokens_reused"] - before == len(first) - 1
    run(engine, [engine.submit([5, 6, 7], greedy)])
    assert engine.stats["prefix_tokens_reused"] - before == len(first) - 1
    assert engine.prefix is not None and engine.prefix.tokens <= engine.prefix.max_tokens


def test_a_seed_gives_the_same_sample_whatever_shares_the_batch(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    ps = prompts(5, tok.vocab_size)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=42)
    alone = BatchEngine(m, tok, max_batch=4).generate(ps[0], params)
    engine = BatchEngine(m, tok, max_batch=4)
    others = [engine.submit(p, SamplingParams(max_tokens=8, seed=i)) for i, p in enumerate(ps[1:])]
    engine._step()
    ours = engine.submit(ps[0], params)
    events = run(engine, [*others, ours])
    assert events[-1][-1] == alone
    assert alone.completion_tokens == 10 or alone.finish_reason == "stop"
    other = BatchEngine(m, tok).generate(ps[0], SamplingParams(max_tokens=10, top_p=0.95, seed=43))
    assert other.text != alone.text


def test_sampling_parameters_on_constructed_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0])
    seen = torch.tensor([True, True, False, False, False])
    counts = torch.tensor([0.0, 0.0, 2.0, 1.0, 0.0])
    rep = sampling_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen=seen)
    assert rep.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0]  # positive seen logits halved, negative ones doubled
    pen = sampling_logits(logits, SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25),
                          counts=counts)  # fmt: skip
    assert pen.tolist() == [2.0, -1.0, 0.5 - 0.5 - 0.5, 3.0 - 0.25 - 0.5, 0.0]
    assert sampling_logits(logits, SamplingParams(temperature=0.5)).tolist() == [4.0, -2.0, 1.0, 6.0, 0.0]
    inf = float("-inf")
    assert sampling_logits(logits, SamplingParams(top_k=2)).tolist() == [2.0, inf, inf, 3.0, inf]
    # softmax: 3.0 -> 0.636, 2.0 -> 0.234: top_p=0.7 needs both, top_p=0.6 only the first.
    assert sampling_logits(logits, SamplingParams(top_p=0.7)).tolist() == [2.0, inf, inf, 3.0, inf]
    assert sampling_logits(logits, SamplingParams(top_p=0.6)).tolist() == [inf, inf, inf, 3.0, inf]
    # min_p=0.2: keep p >= 0.2 * p(3.0), i.e. logits >= 3 + ln 0.2 = 1.39.
    assert sampling_logits(logits, SamplingParams(min_p=0.2)).tolist() == [2.0, inf, inf, 3.0, inf]
    assert sampling_logits(logits, SamplingParams(min_p=0.05)).tolist() == [2.0, inf, 0.5, 3.0, inf]  # >= 0.004
    assert pick(logits, SamplingParams(temperature=0), None) == 3
    only = sampling_logits(logits, SamplingParams(top_k=1))
    assert {pick(only, SamplingParams(), torch.Generator().manual_seed(s)) for s in range(20)} == {3}


def test_invalid_parameters_name_the_field(tok: Tokenizer):
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"),
                       (dict(min_p=1.5), "min_p"), (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"),
                       (dict(presence_penalty=3), "presence_penalty"), (dict(top_logprobs=3), "top_logprobs")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad).validate()
    engine = BatchEngine(make_model(tok.vocab_size, max_seq_len=16), tok)
    with pytest.raises(ValueError, match="the prompt has 16 tokens and the engine's context is 16 tokens"):
        engine.submit([0] * 16, SamplingParams())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.submit([0, 10_000], SamplingParams())
    # A prompt that fits is cut at the end of the context: "length" after the room it leaves.
    done = engine.generate([0] * 13, SamplingParams(max_tokens=50, temperature=0, stop_token_ids=[]))
    assert (done.finish_reason, done.completion_tokens) == ("length", 3) or done.finish_reason == "stop"


def test_stop_text_cuts_before_a_stop_string_split_across_tokens(tok: Tokenizer):
    text = "def hello(world):\n    return world"
    ids = tok.encode(text)
    st = StopText(tok, ["(wor"])
    deltas, stopped = [], False
    for t in ids:
        d, stopped = st.push(t)
        deltas.append(d)
        assert "(" not in "".join(deltas)  # a possible start of the stop string is held back
        if stopped:
            break
    assert stopped and "".join(deltas) == "def hello"
    # No stop: the held-back text is released by flush and everything joins to the decode.
    st = StopText(tok, ["(x"])
    out = "".join(st.push(t)[0] for t in ids)
    assert out == text and st.flush() == ""


def test_engine_stop_string_and_stop_token(tok: Tokenizer):
    x = tok.encode("ab")
    assert len(x) == 2
    a, b = x
    m = make_chain(make_model(tok.vocab_size, seed=4, d_model=64, head_dim=16, init_std=1.0), {0: a, a: b, b: a})
    engine = BatchEngine(m, tok)
    done = engine.generate([0], SamplingParams(max_tokens=20, temperature=0, stop=["bab"]))
    assert done == Finished("stop", 1, 4, "a")  # a b a b: "abab" holds "bab" from the 2nd token on
    h = engine.submit([0], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[b]))
    events = run(engine, [h])[0]
    assert [e.token_id for e in events[:-1]] == [a, b] and events[-1] == Finished("stop", 1, 2, "a")
    assert "".join(e.text for e in events[:-1]) == "a"


def test_cancel_frees_the_slot_and_finishes_cancelled(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    engine = BatchEngine(m, tok, max_batch=2)
    ps = prompts(3, tok.vocab_size)
    greedy = SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[])
    h1, h2, h3 = (engine.submit(p, greedy) for p in ps)
    engine._step()
    assert engine.stats["running"] == 2 and engine.stats["waiting"] == 1
    h1.cancel()
    engine._step()  # h1 leaves, h3 takes its slot
    assert engine.stats["running"] == 2 and engine.stats["waiting"] == 0
    events = list(h1)
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens == len(events) - 1
    rest = run(engine, [h2, h3])
    stops = set(tok.stop_ids)
    assert tokens_of(rest[1], stops) == generate(m, [ps[2]], 30, temperature=0, stop_ids=stops)[0]


def test_logprobs_equal_a_direct_forwards_log_softmax(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    p = prompts(1, tok.vocab_size)[0]
    engine = BatchEngine(m, tok)
    h = engine.submit(p, SamplingParams(max_tokens=4, seed=1, logprobs=True, top_logprobs=3))
    events = [e for e in run(engine, [h])[0] if isinstance(e, TokenEvent)]
    seq = p + [e.token_id for e in events]
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([seq]))[0].float(), dim=-1)
    for i, e in enumerate(events):
        row = lp[len(p) - 1 + i]
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [v for _, v in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == [tok.decode([i], skip_special_tokens=False) for i in top.indices]


def test_threaded_engine_streams_and_async_iterates(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    ps = prompts(4, tok.vocab_size)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    engine = BatchEngine(m, tok, max_batch=2)
    engine.start()
    try:
        handles = [engine.submit(p, greedy) for p in ps]

        async def collect(h):
            return [ev async for ev in h.aiter()]

        async def both():  # two readers on one event loop, one of them joining after events are out
            first = asyncio.create_task(collect(handles[0]))
            await asyncio.sleep(0.05)
            return await first, await collect(handles[1])

        first, second = asyncio.run(both())
        rest = [second, *(list(h) for h in handles[2:])]
    finally:
        engine.stop()
    stops = set(tok.stop_ids)
    got = [tokens_of(ev, stops) for ev in [first, *rest]]
    assert got == [generate(m, [p], 6, temperature=0, stop_ids=stops)[0] for p in ps]
    assert all(isinstance(ev[-1], Finished) and ev[-1].text == "".join(e.text for e in ev[:-1])
               for ev in [first, *rest])  # fmt: skip
    with pytest.raises(RuntimeError, match="stopping"):
        engine.submit(ps[0], greedy)


def test_stop_without_drain_ends_every_request(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    idle = BatchEngine(m, tok)
    h = idle.submit([0, 5], long)
    idle.stop(drain=False)  # never started: the queued request is cancelled, not left hanging
    assert list(h)[-1] == Finished("cancelled", 2, 0, "")
    engine = BatchEngine(m, tok, max_batch=1)
    engine.start()
    handles = [engine.submit([0, 5 + i], long) for i in range(3)]
    engine.stop(drain=False)
    ends = [list(h)[-1] for h in handles]
    assert all(isinstance(e, Finished) for e in ends)
    assert ends[-1].finish_reason == "cancelled"  # still waiting behind the one slot
    assert engine.stats["running"] == 0 and engine.stats["waiting"] == 0


def test_a_reader_whose_event_loop_closed_leaves_the_others_unharmed(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine = BatchEngine(m, tok, max_batch=2)
    engine.start()
    try:
        gone, other = engine.submit([0, 5], long), engine.submit([0, 6], long)

        async def first_event(h):
            async for ev in h.aiter():
                return ev

        assert isinstance(asyncio.run(first_event(gone)), TokenEvent)  # its loop closes while it still generates
        assert list(other)[-1].finish_reason == "length"
        assert gone.finished.wait(10)
    finally:
        engine.stop()
    assert engine.stats["requests_finished"] == 2 and engine.stats["running"] == 0


def test_penalties_track_the_prompt_and_the_output(tok: Tokenizer):
    m = make_model(tok.vocab_size)
    p = prompts(1, tok.vocab_size)[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=3.0,
                            presence_penalty=0.5, frequency_penalty=1.5, logprobs=True)  # fmt: skip
    engine = BatchEngine(m, tok)
    events = [e for e in run(engine, [engine.submit(p, params)])[0] if isinstance(e, TokenEvent)]
    ids = [e.token_id for e in events]
    with torch.no_grad():
        logits = m(torch.tensor([p + ids]))[0, len(p) - 1 :].float()
    for i, e in enumerate(events):  # the penalties of step i see the prompt and the i tokens before it
        x = logits[i].clone()
        seen = sorted(set(p) | set(ids[:i]))
        x[seen] = torch.where(x[seen] > 0, x[seen] / 3.0, x[seen] * 3.0)
        for t in set(ids[:i]):
            x[t] -= 1.5 * ids[:i].count(t) + 0.5
        assert e.token_id == int(x.argmax())
        assert e.logprob == pytest.approx(float(torch.log_softmax(x, -1)[e.token_id]), abs=1e-4)


def test_slot_cache_rows_at_different_positions_under_bf16_autocast():
    m = make_model(97)
    cache = SlotKVCache.for_model(m, slots=2, max_len=16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.tensor([[1, 2, 3]]), cache=cache.use([0]))
        m(torch.tensor([[4]]), cache=cache.use([1]))
        out = m(torch.tensor([[5], [6]]), cache=cache.use([0, 1]))  # rows at 3 and 1: the scattered writes
        full = m(torch.tensor([[1, 2, 3, 5]]))
    assert cache.lens == [4, 2] and cache.k[0].dtype == torch.float32
    torch.testing.assert_close(out[0, 0].float(), full[0, -1].float(), rtol=0, atol=0.1)
