"""Backbone options: attention kinds, document masking, gpt2 arch, MLP kinds, qk_norm, softcap, zero init, and
activation checkpointing applied from outside."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmforge.infer.engine import generate
from lmforge.model.transformer import ModelArgs, Transformer, attention_mask
from lmforge.model.config import ModelConfig
from lmforge.train.activation_checkpointing import apply_activation_checkpointing

V = 61
GPT2 = dict(arch="gpt2", mlp="gelu", tie_embeddings=True)
VARIANTS = {
    "llama": {},
    "gpt2": GPT2,
    "relu2": dict(mlp="relu2", mlp_hidden=128),
    "qk_norm": dict(qk_norm=True, n_kv_heads=2),
    "softcap": dict(logit_softcap=5.0),
    "zero_init": dict(zero_init_out=True),
    "gpt2_relu2_qk": dict(GPT2, mlp="relu2", qk_norm=True),
}


def build(seed: int = 0, **kw) -> Transformer:
    base = dict(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=64,
                max_seq_len=24)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**(base | kw)))
    if kw.get("zero_init_out"):
        # Zero output projections make every block a no-op; perturb them so the masking tests still see signal.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def outputs(model: Transformer, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw)


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position [B, T]: did the output move?"""
    return (a - b).abs().amax(-1) > 1e-5


def flip(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % V
    return y


# ---- attention kinds ----


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_causal_and_bidirectional_leakage(variant: str):
    m = build(**VARIANTS[variant])
    x = torch.randint(0, V, (2, 12))
    y = flip(x, 7)
    c = changed(outputs(m, x), outputs(m, y))
    assert not c[:, :7].any() and c[:, 7:].all()
    b = changed(outputs(m, x, attn="bidirectional"), outputs(m, y, attn="bidirectional"))
    assert b.all()  # every position sees the future token


def test_prefix_lm_masking():
    m = build()
    x = torch.randint(0, V, (2, 12))
    prefix_len = torch.tensor([5, 8])
    base = outputs(m, x, attn="prefix", prefix_len=prefix_len)
    # Inside both rows' prefix: every position (also earlier ones) sees it.
    assert changed(base, outputs(m, flip(x, 3), attn="prefix", prefix_len=prefix_len)).all()
    # Position 6: after row 0's prefix (causal there), inside row 1's prefix (visible to all).
    c = changed(base, outputs(m, flip(x, 6), attn="prefix", prefix_len=prefix_len))
    assert not c[0, :6].any() and c[0, 6:].all()
    assert c[1].all()
    # After both prefixes: earlier outputs are untouched.
    c = changed(base, outputs(m, flip(x, 10), attn="prefix", prefix_len=prefix_len))
    assert not c[:, :10].any() and c[:, 10:].all()
    # prefix_len 0 is plain causal; a full-length prefix is bidirectional.
    torch.testing.assert_close(outputs(m, x, attn="prefix", prefix_len=torch.zeros(2, dtype=torch.long)),
                               outputs(m, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs(m, x, attn="prefix", prefix_len=torch.full((2,), 12)),
                               outputs(m, x, attn="bidirectional"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["causal", "bidirectional", "prefix"])
def test_document_masking_isolates_documents(attn: str):
    m = build(qk_norm=True, n_kv_heads=2)
    x = torch.randint(0, V, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])
    kw = dict(attn=attn, doc_ids=doc_ids, prefix_len=torch.tensor([2, 9]) if attn == "prefix" else None)
    base = outputs(m, x, **kw)
    for t in range(12):
        c = changed(base, outputs(m, flip(x, t), **kw))
        for b in range(2):
            other_doc = doc_ids[b] != doc_ids[b, t]
            assert not c[b, other_doc].any(), (attn, t, b)  # never leaks across documents, either direction
            assert c[b, t]
    # A single document is the same as no document mask; positions are absolute rows, not restarted per document.
    one_doc = torch.zeros(2, 12, dtype=torch.long)
    no_docs = dict(kw, doc_ids=None)
    torch.testing.assert_close(outputs(m, x, **dict(kw, doc_ids=one_doc)), outputs(m, x, **no_docs),
                               rtol=0, atol=1e-5)
    if attn == "causal":
        # Rotary scores depend only on relative positions, so row 0's document 1 (rows 5..11) gives what it gives
        # alone at rows 0..6; learned positions are absolute rows, so under gpt2 arch it does not.
        torch.testing.assert_close(base[0, 5:], outputs(m, x[:1, 5:])[0], rtol=0, atol=1e-4)
        g = build(**GPT2)
        packed = outputs(g, x, attn="causal", doc_ids=doc_ids)
        assert not torch.allclose(packed[0, 5:], outputs(g, x[:1, 5:])[0], atol=1e-3)


def test_attention_mask_shapes_and_errors():
    assert attention_mask("causal", 5) == (None, True)
    assert attention_mask("bidirectional", 5) == (None, False)
    mask, causal = attention_mask("prefix", 4, prefix_len=torch.tensor([2]))
    assert not causal and mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [[True, True, False, False], [True, True, False, False],
                                   [True, True, True, False], [True, True, True, True]]
    mask, _ = attention_mask("bidirectional", 3, doc_ids=torch.tensor([[0, 0, 1]]))
    assert mask[0, 0].tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="attn="):
        attention_mask("sliding", 4)
    with pytest.raises(ValueError, match="prefix_len"):
        attention_mask("prefix", 4)
    with pytest.raises(ValueError, match="prefix_len"):
        attention_mask("causal", 4, prefix_len=torch.tensor([1]))
    with pytest.raises(ValueError, match="doc_ids"):
        attention_mask("causal", 4, doc_ids=torch.zeros(1, 3, dtype=torch.long))


def test_cache_refuses_non_causal_attention():
    from lmforge.model.kv_cache import KVCache

    m = build()
    cache = KVCache.for_model(m, 1)
    with pytest.raises(ValueError, match="causal"):
        m(torch.zeros(1, 3, dtype=torch.long), cache=cache, attn="bidirectional")


# ---- architecture options ----


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_runs_forward_backward_and_generates(variant: str):
    m = build(**VARIANTS[variant]).train()
    x = torch.randint(0, V, (2, 10))
    logits = m(x)
    assert logits.shape == (2, 10, V)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    hidden = m(x, return_hidden=True)
    assert hidden.shape == (2, 10, 32)
    # The KV cache path agrees with a full forward for every variant.
    m.eval()
    prompt = x[:1, :4].tolist()
    out = generate(m, prompt, 6, temperature=0)[0]
    nocache = generate(m, prompt, 6, temperature=0, use_cache=False)[0]
    assert out == nocache


def test_gpt2_layout():
    m = build(**GPT2)
    sd = m.state_dict()
    assert sd["model.embed_positions.weight"].shape == (24, 32)
    assert sd["model.layers.0.mlp.up_proj.weight"].shape == (64, 32)
    assert "model.layers.0.mlp.gate_proj.weight" not in sd
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm"):
        assert torch.equal(sd[f"model.layers.0.{name}.bias"], torch.zeros_like(sd[f"model.layers.0.{name}.bias"]))
    assert isinstance(m.model.norm, torch.nn.LayerNorm) and m.model.norm.bias is not None
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert not hasattr(m, "rope_cos")
    with pytest.raises(ValueError, match="tie_embeddings"):
        ModelArgs(vocab_size=V, n_layers=1, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=64,
                  max_seq_len=8, arch="gpt2")
    # Learned positions: the same token at two positions gives different outputs.
    out = outputs(m, torch.full((1, 4), 7))
    assert (out[0, 0] - out[0, 3]).abs().max() > 1e-4


def test_from_config_maps_options():
    a = ModelArgs.from_config(ModelConfig(depth=2, arch="gpt2"), vocab_size=V)
    assert (a.arch, a.mlp, a.mlp_hidden, a.tie_embeddings) == ("gpt2", "gelu", 512, True)
    b = ModelArgs.from_config(ModelConfig(depth=2, mlp="relu2", qk_norm=True, logit_softcap=30.0,
                                          zero_init_out=True), vocab_size=V)
    assert (b.arch, b.mlp, b.mlp_hidden, b.qk_norm, b.logit_softcap, b.zero_init_out) == (
        "llama", "relu2", 512, True, 30.0, True)
    assert ModelArgs.from_dict(b.to_dict()) == b
    # A model.json written before these fields existed loads with the original model's defaults.
    old = {k: v for k, v in b.to_dict().items()
           if k not in ("arch", "mlp", "qk_norm", "logit_softcap", "zero_init_out")}
    c = ModelArgs.from_dict(old)
    assert (c.arch, c.mlp, c.qk_norm, c.logit_softcap, c.zero_init_out) == ("llama", "swiglu", False, None, False)


def test_relu2_mlp_is_squared_relu():
    m = build(mlp="relu2", mlp_hidden=128)
    mlp = m.model.layers[0].mlp
    assert not hasattr(mlp, "gate_proj") and mlp.up_proj.weight.shape == (128, 32)
    h = torch.randn(3, 32)
    want = mlp.down_proj(torch.relu(mlp.up_proj(h)) ** 2)
    torch.testing.assert_close(mlp(h), want)


def test_qk_norm_weights_are_per_head_dim():
    m = build(qk_norm=True, n_kv_heads=2, norm_eps=1e-12)
    sd = m.state_dict()
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (8,)
    assert sd["model.layers.0.self_attn.k_norm.weight"].shape == (8,)
    # Scaling q_proj leaves outputs unchanged: queries are normalised per head before attention.
    x = torch.randint(0, V, (1, 8))
    before = outputs(m, x)
    with torch.no_grad():
        for blk in m.model.layers:
            blk.self_attn.q_proj.weight.mul_(7.0)
            blk.self_attn.k_proj.weight.mul_(0.3)
    torch.testing.assert_close(outputs(m, x), before, rtol=0, atol=1e-4)


def test_zero_init_out_zeroes_output_projections():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8,
                              mlp_hidden=64, max_seq_len=8, zero_init_out=True))
    for blk in m.model.layers:
        assert not blk.self_attn.o_proj.weight.any() and not blk.mlp.down_proj.weight.any()
        assert blk.self_attn.q_proj.weight.any()
    assert not m.lm_head.weight.any()
    assert not m(torch.randint(0, V, (1, 5))).any()
    tied = Transformer(ModelArgs(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8,
                                 mlp_hidden=64, max_seq_len=8, zero_init_out=True, tie_embeddings=True))
    assert tied.lm_head.weight.any()  # tied to the embeddings, which must not be zero


def test_logit_softcap_bounds_logits():
    m = build(logit_softcap=2.0)
    with torch.no_grad():
        m.lm_head.weight.mul_(1000.0)
    logits = outputs(m, torch.randint(0, V, (2, 8)))
    assert logits.dtype == torch.float32
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
    bf = build(logit_softcap=2.0).to(torch.bfloat16)
    assert outputs(bf, torch.randint(0, V, (1, 4))).dtype == torch.float32


def test_flops_per_token_for_each_mlp_kind():
    def flops(**kw):
        return build(**kw).flops_per_token(16)

    d, L, attn_scores = 32, 2, 12.0 * 2 * 32 * 16
    attn = 4 * d * d
    assert flops() == 6.0 * (L * (attn + 3 * d * 64) + V * d) + attn_scores
    assert flops(mlp="relu2", mlp_hidden=128) == 6.0 * (L * (attn + 2 * d * 128) + V * d) + attn_scores
    assert flops(**GPT2, mlp_hidden=128) == 6.0 * (L * (attn + 2 * d * 128) + V * d) + attn_scores
    assert flops(qk_norm=True) == flops()
    g = build(**GPT2)
    per_layer = 4 * (d * d + d) + 2 * (d * 64) + 64 + d + 4 * d
    assert g.num_params() == V * d + 24 * d + L * per_layer + 2 * d
    assert g.num_params(non_embedding=True) == L * per_layer + 2 * d


# ---- activation checkpointing ----


@pytest.mark.parametrize("every,expected", [(1, 3), (2, 2), (3, 1), (5, 1)])
def test_activation_checkpointing_matches_plain(every: int, expected: int):
    kw = dict(n_layers=3, qk_norm=True)
    plain, ckpt = build(seed=1, **kw).train(), build(seed=1, **kw).train()
    keys = list(ckpt.state_dict())
    assert apply_activation_checkpointing(ckpt, every) == expected
    assert list(ckpt.state_dict()) == keys == list(plain.state_dict())
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randint(0, V, (2, 12))
    doc_ids = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
    for model in (plain, ckpt):
        logits = model(x, attn="prefix", prefix_len=torch.tensor([3, 4]), doc_ids=doc_ids)
        model.loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
        model.loss.backward()
    assert torch.allclose(plain.loss, ckpt.loss, rtol=0, atol=1e-7)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-8), name


def test_activation_checkpointing_recomputes_and_survives_copies():
    m = build().train()
    assert apply_activation_checkpointing(m, 0) == 0
    assert apply_activation_checkpointing(m, 1) == 2
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(m, 1)
    with pytest.raises(ValueError, match=">= 0"):
        apply_activation_checkpointing(build(), -1)
    calls = []
    m.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    m(torch.randint(0, V, (1, 6))).sum().backward()
    assert len(calls) == 2  # forward, then recomputed in backward
    # A deep copy (a frozen reference model, an EMA) checkpoints its own blocks, not the original's.
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    x = torch.randint(0, V, (1, 6))
    assert not torch.equal(twin(x), m(x))
    assert twin.model.layers[0].forward.__self__ is twin.model.layers[0]
    # Inference with a cache (no grad) runs each block once and gives the uncheckpointed result.
    m.eval()
    plain = build().eval()
    plain.load_state_dict(m.state_dict())
    prompt = [[1, 2, 3]]
    assert generate(m, prompt, 5, temperature=0) == generate(plain, prompt, 5, temperature=0)


def test_init_std_still_scaled_for_gpt2():
    m = build(seed=2, n_layers=8, d_model=64, n_heads=4, head_dim=16, mlp_hidden=256, **GPT2)
    out_w = torch.cat([blk.mlp.down_proj.weight.flatten() for blk in m.model.layers])
    assert out_w.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
