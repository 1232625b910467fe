from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.lora import trainable_parameters
from lmforge.model.prefix import (
    PREFIX_CONFIG,
    PREFIX_WEIGHTS,
    PrefixConfig,
    PrefixTuning,
    apply_prefix,
    load_prefix,
    prefix_state_dict,
    remove_prefix,
    save_prefix,
)
from lmforge.infer.engine import generate
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import ModelArgs, Transformer, apply_rope, attention_mask

# n_kv_heads < n_heads: every test runs with grouped-query attention unless it says otherwise.
ARGS = dict(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=64, max_seq_len=48)
GPT2 = dict(arch="gpt2", tie_embeddings=True)
P = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model gains nothing from threads; on a busy 2-core machine their spin-waits make it 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**ARGS, **over})).eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ARGS["vocab_size"], (batch, length), generator=g)


def with_prefix(model: Transformer, seed: int = 5, scale: float = 1.0, **cfg) -> PrefixTuning:
    """A prefix with values large enough to change the model's output clearly."""
    torch.manual_seed(seed)
    module = apply_prefix(model, PrefixConfig(length=P, **cfg))
    if not module.reparam:
        with torch.no_grad():
            module.prefix.normal_(std=scale)
    return module


def lm_loss(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train(model: Transformer, steps: int, lr: float) -> list[float]:
    x = ids(4, 16, seed=3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(length=0), "length must be >= 1"),
        (dict(mlp_hidden=0), "mlp_hidden"),
        (dict(init="text"), r"init='text'.*'random', 'tokens'"),
        (dict(init="tokens"), "needs init_tokens"),
        (dict(init="tokens", init_tokens=(1, 2), reparam=True), "needs reparam=False"),
        (dict(init_tokens=(1, 2)), "only with init='tokens'"),
        (dict(init_std=0.0), "init_std"),
    ],
)
def test_config_errors_name_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixConfig(**kwargs)


# --- the attention hook -----------------------------------------------------------------------------------------


def reference_attention(attn, x, cos, sin, pk, pv, visible) -> torch.Tensor:
    """Attention over [prefix; real keys] written out by hand; `visible` [..., T, S] says which real keys a query
    may see, every prefix key is visible."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2).repeat_interleave(H // Hkv, dim=1)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2).repeat_interleave(H // Hkv, dim=1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(D)
    seen = torch.cat([torch.ones(*visible.shape[:-1], pk.shape[2], dtype=torch.bool), visible], dim=-1)
    y = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ values
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def hooked_layer(n_kv_heads: int):
    model = make_model(n_kv_heads=n_kv_heads)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(9)
    pk, pv = (torch.randn(1, n_kv_heads, P, ARGS["head_dim"], generator=g) for _ in range(2))
    attn.prefix_kv = lambda b: (pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1))
    return model, attn, pk, pv


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix", "causal+docs", "prefix+docs"])
def test_hook_matches_hand_written_attention(kind, n_kv_heads):
    model, attn, pk, pv = hooked_layer(n_kv_heads)
    B, T = 2, 9
    x = torch.randn(B, T, ARGS["d_model"], generator=torch.Generator().manual_seed(1))
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    attn_kind = kind.split("+")[0]
    prefix_len = torch.tensor([3, 6]) if attn_kind == "prefix" else None
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 2 + [1] * 3 + [2] * 4]) if "docs" in kind else None
    visible = torch.ones(B, T, T, dtype=torch.bool)
    if attn_kind != "bidirectional":
        visible = visible & (j <= i)
    if prefix_len is not None:
        visible = visible | (j < prefix_len[:, None, None])
    if doc_ids is not None:
        visible = visible & (doc_ids[:, :, None] == doc_ids[:, None, :])
    mask, causal = attention_mask(attn_kind, T, prefix_len=prefix_len, doc_ids=doc_ids)
    with torch.no_grad():
        out = attn(x, cos, sin, mask=mask, causal=causal)
        ref = reference_attention(attn, x, cos, sin, pk, pv, visible[:, None])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_hook_with_cache_matches_hand_written_attention(n_kv_heads):
    """First chunk, a chunk after the cache, then single tokens: the prefix is prepended on every call."""
    model, attn, pk, pv = hooked_layer(n_kv_heads)
    B, T = 2, 10
    x = torch.randn(B, T, ARGS["d_model"], generator=torch.Generator().manual_seed(2))
    cache = KVCache(1, B, n_kv_heads, T, ARGS["head_dim"])
    outs = []
    with torch.no_grad():
        for start, stop in [(0, 5), (5, 8), (8, 9), (9, 10)]:
            cos, sin = model.rope_cos[start:stop], model.rope_sin[start:stop]
            outs.append(attn(x[:, start:stop], cos, sin, cache=cache))
            cache.advance(stop - start)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        ref = reference_attention(attn, x, model.rope_cos[:T], model.rope_sin[:T], pk, pv, causal)
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_hook_is_not_part_of_the_state_dict():
    model = make_model()
    base_keys = list(model.state_dict())
    assert all(layer.self_attn.prefix_kv is None for layer in model.model.layers)
    with_prefix(model)
    assert all(layer.self_attn.prefix_kv is not None for layer in model.model.layers)
    assert list(model.state_dict()) == base_keys + ["prefix_tuning.prefix"]
    assert list(prefix_state_dict(model)) == ["prefix_tuning.prefix"]
    remove_prefix(model)
    assert list(model.state_dict()) == base_keys


# --- training ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reparam", [False, True])
def test_only_the_prefix_trains_and_the_base_is_bit_identical(reparam):
    model = make_model(init_std=0.2)  # at 0.02 the tiny random base barely lets attention change the loss
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    module = apply_prefix(model, PrefixConfig(length=P, reparam=reparam, mlp_hidden=16))
    L, Hkv, D, d = ARGS["n_layers"], ARGS["n_kv_heads"], ARGS["head_dim"], ARGS["d_model"]
    width = L * 2 * Hkv * D
    expected = P * d + (d * 16 + 16) + (16 * width + width) if reparam else L * 2 * Hkv * P * D
    trainable, total = trainable_parameters(model)
    assert (trainable, total) == (expected, expected + make_model().num_params())

    model.train()
    lm_loss(model, ids(2, 12, seed=1)).backward()
    for n, p in model.named_parameters():
        if n.startswith("prefix_tuning."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.zero_grad()

    losses = train(model, steps=25, lr=5e-2)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)
    assert module.reparam == reparam


def test_bf16_autocast_casts_the_prefix():
    model = make_model()
    with_prefix(model, scale=0.5)
    x = ids(2, 10, seed=4)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = lm_loss(model, x)
    loss.backward()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)
    assert model.prefix_tuning.prefix.grad.dtype == torch.float32


# --- effect on the model, removal -------------------------------------------------------------------------------


def test_prefix_changes_output_and_remove_restores_the_plain_model():
    model = make_model()
    model.model.embed_tokens.requires_grad_(False)  # a choice remove_prefix must give back
    x = ids(2, 12, seed=1)
    base = model(x)
    with_prefix(model)
    assert not torch.allclose(model(x), base, atol=1e-3)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("prefix_tuning."))
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix(model, PrefixConfig(length=2))
    remove_prefix(model)
    assert torch.equal(model(x), base)
    assert not hasattr(model, "prefix_tuning")
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    with pytest.raises(ValueError, match="no prefix attached"):
        remove_prefix(model)


def test_init_from_the_models_own_keys_and_values():
    model = make_model()
    tokens = (3, 5, 7)
    module = apply_prefix(model, PrefixConfig(length=5, init="tokens", init_tokens=tokens))
    cycled = torch.tensor([3, 5, 7, 3, 5])
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(cycled))
        v = attn.v_proj(h).view(5, ARGS["n_kv_heads"], ARGS["head_dim"]).transpose(0, 1)
        k = attn.k_proj(h).view(5, ARGS["n_kv_heads"], ARGS["head_dim"]).transpose(0, 1)
        k = apply_rope(k, model.rope_cos[:5], model.rope_sin[:5])
    torch.testing.assert_close(module.prefix[0, 0], k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(module.prefix[0, 1], v, atol=1e-6, rtol=1e-6)
    assert module.prefix.requires_grad
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        apply_prefix(make_model(), PrefixConfig(length=2, init="tokens", init_tokens=(1, 999)))


# --- decoding with the KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [{}, GPT2], ids=["llama", "gpt2"])
def test_cached_decoding_matches_full_forward(arch):
    model = make_model(**arch)
    with_prefix(model)
    x = ids(2, 12, seed=6)
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 2, 12)
        steps = [model(x[:, a:b], cache=cache) for a, b in [(0, 5), (5, 9), (9, 10), (10, 11), (11, 12)]]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)

    prompts = [x[0, :5].tolist(), x[1, :5].tolist(), x[1, :3].tolist()]
    cached = generate(model, prompts, 8, temperature=0)
    assert cached == generate(model, prompts, 8, temperature=0, use_cache=False)
    for prompt, new in zip(prompts, cached):
        assert len(new) == 8
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new]))[0]
        assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == new


# --- packed documents -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [{}, GPT2], ids=["llama", "gpt2"])
def test_packed_documents_each_see_the_prefix_and_only_their_own_tokens(arch):
    model = make_model(**arch)
    with_prefix(model)
    lengths = [5, 7, 6]
    doc_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)]] * 2)
    bounds = [(sum(lengths[:d]), sum(lengths[: d + 1])) for d in range(len(lengths))]
    x = ids(2, sum(lengths), seed=7)
    with torch.no_grad():
        packed = model(x, doc_ids=doc_ids)
        # The first document sits at the positions it would have alone: it matches running it alone.
        first = bounds[0][1]
        torch.testing.assert_close(packed[:, :first], model(x[:, :first]), atol=1e-5, rtol=1e-5)
        # Every document is untouched by the others' tokens (positions are absolute, so later documents are
        # compared at their own offsets).
        for d, (a, b) in enumerate(bounds):
            other = ids(2, sum(lengths), seed=20 + d)
            other[:, a:b] = x[:, a:b]
            torch.testing.assert_close(model(other, doc_ids=doc_ids)[:, a:b], packed[:, a:b], atol=1e-5, rtol=1e-5)
        remove_prefix(model)
        plain = model(x, doc_ids=doc_ids)
    for a, b in bounds:  # and every document sees the prefix
        assert not torch.allclose(packed[:, a:b], plain[:, a:b], atol=1e-3)


# --- saving and loading -----------------------------------------------------------------------------------------


def test_reparam_save_load_round_trip_is_exact(tmp_path):
    model = make_model()
    torch.manual_seed(1)
    module = apply_prefix(model, PrefixConfig(length=P, reparam=True, mlp_hidden=16))
    train(model, steps=3, lr=1e-2)
    x = ids(2, 12, seed=8)
    with torch.no_grad():
        trained = model(x)
    out = save_prefix(model, tmp_path / "prefix")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefix"]  # no staging directory left behind
    assert sorted(p.name for p in out.iterdir()) == sorted([PREFIX_CONFIG, PREFIX_WEIGHTS])

    fresh = make_model()
    loaded = load_prefix(fresh, out)
    assert not loaded.reparam and not loaded.prefix.requires_grad
    assert not any(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        assert torch.equal(fresh(x), trained)

    module.materialize()  # the MLP folds into the tensor it produced, bit for bit
    assert not module.reparam and module.prefix.requires_grad
    assert list(prefix_state_dict(model)) == ["prefix_tuning.prefix"]
    with torch.no_grad():
        assert torch.equal(model(x), trained)
    save_prefix(module, out)  # saving over an existing prefix directory replaces it
    assert torch.equal(load_prefix(make_model(), out, trainable=True).prefix.detach(), module.prefix.detach())


def test_loading_into_the_wrong_model_names_the_mismatch(tmp_path):
    model = make_model()
    with_prefix(model)
    save_prefix(model, tmp_path / "p")
    mismatch = r"prefix\.safetensors was saved for a different model: n_kv_heads: file 2, model 4"
    with pytest.raises(ValueError, match=mismatch):
        load_prefix(make_model(n_kv_heads=4), tmp_path / "p")
    with pytest.raises(ValueError, match=r"n_layers: file 2, model 3"):
        load_prefix(make_model(n_layers=3), tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="not a prefix directory"):
        load_prefix(make_model(), tmp_path / "missing")
    other = make_model()
    with_prefix(other)
    with pytest.raises(ValueError, match="already has a prefix"):
        load_prefix(other, tmp_path / "p")
