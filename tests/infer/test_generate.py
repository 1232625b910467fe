"""Generation: the KV cache agrees with full recomputation, batching, EOS and stop ids, sampling filters, streaming
text and streaming into a caller's cache."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from helpers import make_chain
from lmforge.infer.engine import generate, sample_next, stream_text, stream_tokens
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer

V = 97


def make_model(seed: int = 0, vocab_size: int = V, **kw) -> Transformer:
    base = dict(vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=64,
                max_seq_len=48, init_std=0.2)
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**(base | kw))).eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:8]
    texts = [f.read_text(encoding="utf-8") for f in files]
    return train_tokenizer(texts + ["héllo wörld, café naïve"] * 3, vocab_size=400)


PROMPTS = [[0, 5, 6, 7, 8], [0, 9], [0, 11, 12], [0, 13, 14, 15, 16, 17, 18]]


def test_chunked_cache_forward_matches_full_forward():
    m = make_model()
    x = torch.randint(0, V, (2, 10))
    cache = KVCache.for_model(m, batch_size=2, max_len=10)
    with torch.no_grad():
        full = m(x)
        parts = [m(x[:, :5], cache=cache), m(x[:, 5:9], cache=cache), m(x[:, 9:], cache=cache)]
    assert cache.pos == 10
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot hold 11"):
        m(x[:, :1], cache=cache)


def test_cache_equals_no_cache_greedy():
    m = make_model()
    with_cache = generate(m, PROMPTS, 20, temperature=0)
    assert with_cache == generate(m, PROMPTS, 20, temperature=0, use_cache=False)
    assert [len(r) for r in with_cache] == [20] * 4


def test_cache_equals_no_cache_sampling_with_same_seed():
    m = make_model()
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, seed=123)
    a = generate(m, PROMPTS, 20, **kw)
    assert a == generate(m, PROMPTS, 20, use_cache=False, **kw)
    assert a == generate(m, PROMPTS, 20, **kw)
    assert a != generate(m, PROMPTS, 20, **(kw | {"seed": 124}))


def test_batch_of_different_lengths_equals_one_prompt_at_a_time():
    m = make_model(seed=1)
    batch = generate(m, PROMPTS + [[0, 21, 22]], 15, temperature=0)
    singles = [generate(m, [p], 15, temperature=0)[0] for p in PROMPTS + [[0, 21, 22]]]
    assert batch == singles


def test_generate_under_autocast_and_in_bf16():
    m = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(m, PROMPTS, 6, temperature=0)
    assert [len(r) for r in out] == [6] * 4
    out = generate(m.to(torch.bfloat16), PROMPTS, 6, temperature=0.8, seed=0)
    assert [len(r) for r in out] == [6] * 4 and all(0 <= t < V for r in out for t in r)


def test_eos_stops_a_row_and_is_not_returned():
    m = make_model(seed=2)
    free = generate(m, PROMPTS, 12, temperature=0)
    eos = free[0][4]
    stopped = generate(m, PROMPTS, 12, temperature=0, eos_id=eos)
    for row_free, row_stopped in zip(free, stopped):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row_stopped == row_free[:cut]
    assert len(stopped[0]) <= 4


def test_invalid_requests_raise():
    m = make_model()
    with pytest.raises(ValueError, match="max_seq_len=48"):
        generate(m, [[0] * 40], 9)
    with pytest.raises(ValueError, match="^the prompt alone has 48 tokens and the model's context is 48 tokens: "
                       "shorten the prompt$"):  # fmt: skip
        generate(m, [[0] * 48], 1)
    assert len(generate(m, [[0] * 40], 8, temperature=0)[0]) == 8
    with pytest.raises(ValueError, match="empty"):
        generate(m, [[]], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [[0]], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, [[0]], 3, top_p=0.0)
    assert generate(m, [[0], [1, 2]], 0) == [[], []]


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)

    def drawn(**kw) -> set[int]:
        return set(sample_next(logits, generator=gen, **kw).tolist())

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.8) == {0, 1}  # 0.5 + 0.3 already reach 0.8
    assert drawn(top_p=0.81) == {0, 1, 2}
    assert drawn(top_p=0.01) == {0}
    assert drawn(temperature=0) == {0}
    assert drawn(temperature=0.05) == {0}  # sharpened: p(1) = (0.3/0.5)^20 / ... < 1e-4


def test_stream_text_joins_to_decoded_generation(tok: Tokenizer):
    m = make_model(seed=3, vocab_size=tok.vocab_size, init_std=0.5)
    kw = dict(temperature=1.0, top_k=None, top_p=None, seed=7)
    prompt = "def f(x):"
    pieces = list(stream_text(m, tok, prompt, 30, **kw))
    ids = generate(m, [[tok.bos_id] + tok.encode(prompt)], 30, eos_id=tok.eos_id, **kw)[0]
    assert "".join(pieces) == tok.decode(ids)
    assert len(pieces) > 1


def _bigram_model(tok: Tokenizer, chain: dict[int, int]) -> Transformer:
    """A model whose greedy choice after token t is chain[t] (see helpers.make_chain)."""
    return make_chain(make_model(seed=4, vocab_size=tok.vocab_size, d_model=64, head_dim=16, init_std=1.0), chain)


def test_stream_text_emits_multibyte_characters_whole(tok: Tokenizer):
    ri = tok.encode("日")
    assert len(ri) == 3  # the tokenizer never saw CJK, so the character is three byte tokens
    start = tok.encode("x")[-1]
    m = _bigram_model(tok, {start: ri[0], ri[0]: ri[1], ri[1]: ri[2], ri[2]: ri[0]})
    pieces = list(stream_text(m, tok, "x", 12, temperature=0, seed=0))
    assert pieces == ["日"] * 4
    ids = generate(m, [[tok.bos_id] + tok.encode("x")], 12, temperature=0)[0]
    assert ids == ri * 4
    # A stream cut mid-character still ends with everything decoded (a replacement character for the partial).
    cut = list(stream_text(m, tok, "x", 11, temperature=0))
    assert "".join(cut) == tok.decode(ri * 3 + ri[:2]) == "日日日\ufffd"


def test_stream_text_stops_at_eos(tok: Tokenizer):
    a, b = tok.encode("ab")[:1], tok.encode("c")
    start = tok.encode("x")[-1]
    m = _bigram_model(tok, {start: a[0], a[0]: b[0], b[0]: tok.eos_id, tok.eos_id: a[0]})
    assert "".join(stream_text(m, tok, "x", 10, temperature=0)) == tok.decode([a[0], b[0]])
    assert generate(m, [[0, start]], 10, temperature=0, eos_id=tok.eos_id) == [[a[0], b[0]]]


def test_stop_ids_end_a_row_like_eos():
    m = make_model(seed=2)
    free = generate(m, PROMPTS, 12, temperature=0)
    stops = {free[0][3], free[1][5]}
    stopped = generate(m, PROMPTS, 12, temperature=0, stop_ids=stops)
    for row_free, row_stopped in zip(free, stopped):
        cut = min([row_free.index(s) for s in stops if s in row_free], default=len(row_free))
        assert row_stopped == row_free[:cut]
    assert len(stopped[0]) <= 3 and len(stopped[1]) <= 5


def test_stream_text_stops_at_a_stop_id_without_emitting_it(tok: Tokenizer):
    a, b, end = tok.encode("a")[0], tok.encode("b")[0], tok.token_to_id("<|end|>")
    start = tok.encode("x")[-1]
    m = _bigram_model(tok, {start: a, a: b, b: end, end: a})
    assert "".join(stream_text(m, tok, "x", 10, temperature=0, stop_ids=[end])) == "ab"
    # Without the stop id the chain runs on: a b <|end|> a b <|end|> a, and decoding skips the special token.
    assert "".join(stream_text(m, tok, "x", 7, temperature=0)) == "ababa"


def test_stream_tokens_extends_a_cache_that_holds_the_prompt_start():
    m = make_model(seed=5)
    prompt = [0, 5, 6, 7, 8, 9, 10]
    cache = KVCache.for_model(m, 1)
    with torch.inference_mode():
        m(torch.tensor([prompt[:4]]), cache=cache)
    out = list(stream_tokens(m, prompt, 6, temperature=0, cache=cache))
    assert out == generate(m, [prompt], 6, temperature=0)[0]
    assert cache.pos == len(prompt) + 5  # every token but the last was fed back
    with pytest.raises(ValueError, match="fewer than"):
        list(stream_tokens(m, prompt[:3], 2, cache=cache))
