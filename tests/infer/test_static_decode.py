"""The fixed-shape decode step (`lmforge.infer.static_decode`): the same logits as the model's own forward for every
architecture, rows at their own positions, padding rows that touch only free slots, and the compiled engine giving
the eager engine's tokens."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from lmforge.infer.batching import BatchEngine, SamplingParams, TokenEvent
from lmforge.infer.static_decode import StaticDecoder, buckets, decode_step, unsupported
from lmforge.model.kv_cache import SlotKVCache
from lmforge.model.prefix import PrefixConfig, apply_prefix
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer

ARCHS = {
    "llama-gqa-qknorm": dict(qk_norm=True, n_kv_heads=2),
    "llama-bias-softcap": dict(attn_bias="qkvo", logit_softcap=15.0),
    "gpt2": dict(arch="gpt2", mlp="gelu", tie_embeddings=True),
}


def make_model(vocab: int = 97, **kw) -> Transformer:
    base = dict(vocab_size=vocab, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=64,
                max_seq_len=32, init_std=0.2)  # fmt: skip
    torch.manual_seed(0)
    return Transformer(ModelArgs(**(base | kw))).eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rows_at_their_own_positions_match_full_forwards(arch: str):
    m = make_model(**ARCHS[arch])
    seqs = [torch.randint(0, 97, (n,)) for n in (9, 4, 12)]
    cache = SlotKVCache.for_model(m, slots=4, max_len=32)
    m.rope(0, 32)
    with torch.no_grad():
        full = [m(s[None])[0] for s in seqs]
        for slot, s in enumerate(seqs):  # prefill each row alone, all but its last 3 tokens
            m(s[None, :-3], cache=cache.use([slot]))
        filled = [k.clone() for k in cache.k]
        # One token per row, then two (as when drafts are verified), with a padding row in free slot 3.
        for back, width in ((3, 1), (2, 2)):
            tokens = torch.stack([s[len(s) - back : len(s) - back + width] for s in seqs] + [torch.zeros(width)])
            positions = torch.stack([torch.arange(len(s) - back, len(s) - back + width) for s in seqs]
                                    + [torch.arange(width)])  # fmt: skip
            out = decode_step(m, tokens.long(), positions, cache.k, cache.v)
            assert out.shape == (4, width, 97)
            for row, s in enumerate(seqs):
                want = full[row][len(s) - back : len(s) - back + width].float()
                torch.testing.assert_close(out[row], want, rtol=0, atol=1e-5)
    for layer, before in enumerate(filled):  # each row wrote exactly its three positions, the pad row slot 3 only
        for slot, s in enumerate(seqs):
            torch.testing.assert_close(cache.k[layer][slot, :, : len(s) - 3], before[slot, :, : len(s) - 3])
            assert torch.equal(cache.k[layer][slot, :, len(s) :], before[slot, :, len(s) :])


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]


def test_a_prefix_tuned_model_keeps_the_eager_step():
    m = make_model()
    apply_prefix(m, PrefixConfig(length=3))
    assert "prefix" in unsupported(m)
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=97)
    engine = BatchEngine(m, tok, max_batch=2, compile=True)
    assert engine.decoder is None


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:8]
    return train_tokenizer([f.read_text(encoding="utf-8") for f in files], vocab_size=300)


def test_compiled_engine_gives_the_eager_engines_tokens(tok: Tokenizer):
    """Inductor compiles the two buckets of max_batch=2 and the verification of 3 drafted tokens; three requests
    (so rows join, leave and pad) decode greedily to the same tokens as the eager engine, then one more runs alone,
    with drafts from its repetitive prompt."""
    m = make_model(tok.vocab_size, max_seq_len=48)
    g = torch.Generator().manual_seed(3)
    ps = [[0, *torch.randint(5, tok.vocab_size, (n,), generator=g).tolist()] for n in (3, 7, 5)]
    ps.append([0, *[40, 41, 42] * 5])
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    def tokens(engine: BatchEngine) -> list[list[int]]:
        engine.start()
        handles = [engine.submit(p, greedy) for p in ps[:3]]
        out = [[e.token_id for e in h if isinstance(e, TokenEvent)] for h in handles]
        out += [[e.token_id for e in engine.submit(ps[3], greedy) if isinstance(e, TokenEvent)]]
        engine.stop()
        return out

    compiled = BatchEngine(m, tok, max_batch=2, compile=True, draft=3)
    assert isinstance(compiled.decoder, StaticDecoder) and compiled.decoder.sizes == [1, 2]
    got = tokens(compiled)
    assert compiled.decoder is not None, "compilation failed and the engine fell back to eager"
    assert compiled.stats["draft_tokens"] > 0
    assert got == tokens(BatchEngine(m, tok, max_batch=2))
    assert all(len(t) == 10 for t in got)
