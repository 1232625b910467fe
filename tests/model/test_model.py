"""The backbone, the CLM objective and the checkpoint format."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import io
from lmforge.io import staged_dir
from lmforge.model.io import load_model, save_model, write_model_files
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import clm_loss, token_nll
from lmforge.model.config import ModelConfig

V = 97


def tiny(**kw) -> ModelArgs:
    base = dict(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_hidden=64,
                max_seq_len=32)
    return ModelArgs(**(base | kw))


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw))


def test_depth_dial_derives_width_heads_and_mlp():
    a = ModelArgs.from_config(ModelConfig(depth=3), vocab_size=V)
    assert (a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.mlp_hidden) == (3, 192, 3, 3, 64, 512)
    b = ModelArgs.from_config(ModelConfig(depth=2), vocab_size=V)
    assert (b.d_model, b.n_heads, b.mlp_hidden) == (128, 2, 384)  # 8/3 * 128 = 341.3 -> next multiple of 64
    c = ModelArgs.from_config(
        ModelConfig(depth=2, d_model=96, n_heads=6, n_kv_heads=2, mlp_hidden=100, tie_embeddings=True), vocab_size=V
    )
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_hidden, c.tie_embeddings) == (96, 6, 2, 16, 100, True)
    assert ModelArgs.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown model args"):
        ModelArgs.from_dict(c.to_dict() | {"dropout": 0.1})


def test_parameter_names_and_shapes_match_llama():
    m = build(n_kv_heads=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {"model.embed_tokens.weight": (V, 32), "model.norm.weight": (32,), "lm_head.weight": (V, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (32, 32),
            p + "self_attn.k_proj.weight": (16, 32),
            p + "self_attn.v_proj.weight": (16, 32),
            p + "self_attn.o_proj.weight": (32, 32),
            p + "mlp.gate_proj.weight": (64, 32),
            p + "mlp.up_proj.weight": (64, 32),
            p + "mlp.down_proj.weight": (32, 64),
            p + "input_layernorm.weight": (32,),
            p + "post_attention_layernorm.weight": (32,),
        }
    assert shapes == expected  # rotary tables are not persistent, so they are absent


def test_no_causal_leakage():
    m = build()
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 7] = (x[:, 7] + 1) % V
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(dim=-1).min() > 1e-4


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = build(n_kv_heads=2)
    mha = build(n_kv_heads=4)
    sd = gqa.state_dict()
    for name in list(sd):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # kv head j serves query heads 2j and 2j+1, the repeat_kv convention of HF Llama.
            sd[name] = sd[name].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    x = torch.randint(0, V, (3, 10))
    with torch.no_grad():
        out = gqa(x)
        assert out.shape == (3, 10, V)
        torch.testing.assert_close(out, mha(x), rtol=0, atol=1e-5)


def test_param_count_formula():
    d, L, m_hidden, kv = 32, 2, 64, 2
    per_layer = d * d + 2 * d * (kv * 8) + d * d + 3 * d * m_hidden + 2 * d
    untied = build(n_kv_heads=kv)
    assert untied.num_params() == V * d + L * per_layer + d + V * d
    assert untied.num_params(non_embedding=True) == L * per_layer + d + V * d
    tied = build(n_kv_heads=kv, tie_embeddings=True)
    assert tied.num_params() == V * d + L * per_layer + d
    assert tied.num_params(non_embedding=True) == L * per_layer + d


def test_tied_weights_share_storage():
    m = build(tie_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    sd = m.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()


def test_init_is_deterministic_and_scaled():
    a, b, c = build(seed=3, n_layers=8), build(seed=3, n_layers=8), build(seed=4, n_layers=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(a.model.norm.weight, torch.ones(32))
    out_w = torch.cat([blk.mlp.down_proj.weight.flatten() for blk in a.model.layers])
    in_w = torch.cat([blk.mlp.up_proj.weight.flatten() for blk in a.model.layers])
    assert out_w.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert in_w.std().item() == pytest.approx(0.02, rel=0.05)


def test_flops_per_token_hand_computed():
    m = Transformer(tiny(vocab_size=100, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=192))
    # per layer: q,o 2*64*64 = 8192; k,v 2*64*32 = 4096; mlp 3*64*192 = 36864 -> 49152; x2 layers + lm_head 6400
    # = 104704 matmul params; 6 * 104704 + 12 * 2 * 64 * 32 = 628224 + 49152
    assert m.flops_per_token(32) == 677376.0


def test_rope_tables_recomputed_by_init_weights():
    m = build()
    cos = m.rope_cos.clone()
    m.rope_cos.zero_()
    m.init_weights()
    assert torch.equal(m.rope_cos, cos)
    assert "rope_cos" not in m.state_dict()


def test_too_long_input_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        build()(torch.zeros(1, 33, dtype=torch.long))


def test_clm_loss_and_token_nll():
    m = build()
    x = torch.randint(0, V, (2, 9))
    y = torch.randint(0, V, (2, 9))
    y[0, :4] = -100
    with torch.no_grad():
        logits = m(x).float()
        loss, metrics = clm_loss(m, (x, y))
        nll = token_nll(m, x, y)
    logp = logits.log_softmax(-1)
    mask = y != -100
    manual = -logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    assert nll.shape == (2, 9)
    assert torch.equal(nll[~mask], torch.zeros(4))
    torch.testing.assert_close(nll[mask], manual[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, manual[mask].mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()), rtol=0, atol=1e-6)
    assert metrics == {}


def test_clm_loss_is_fp32_for_bf16_models():
    m = build().to(torch.bfloat16)
    x = torch.randint(0, V, (1, 8))
    loss, _ = clm_loss(m, (x, x))
    assert loss.dtype == torch.float32
    loss.backward()
    assert m.model.embed_tokens.weight.grad is not None


# ---- checkpoint format ----


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, tie: bool):
    m = build(seed=5, tie_embeddings=tie, n_kv_heads=2)
    tok = tmp_path / "tok.json"
    tok.write_text('{"stand-in": true}')
    out = save_model(tmp_path / "ckpt", m, m.args, tokenizer_path=tok)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "model.json").read_text()) == {"args": m.args.to_dict(), "format": 1}
    loaded, args = load_model(out)
    assert args == m.args
    assert loaded.state_dict().keys() == m.state_dict().keys()
    for (name, p), q in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    assert not list(tmp_path.glob("ckpt.tmp-*"))


def test_load_names_the_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"is neither an lmforge checkpoint \(model.json\) nor a Hugging Face "
                                                r"model directory \(config.json\)"):  # fmt: skip
        load_model(tmp_path)
    m = build()
    save_model(tmp_path / "c", m, m.args)
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_model(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        io.load_checkpoint_tokenizer(tmp_path / "c")


def test_save_replaces_old_checkpoint_and_failure_leaves_nothing_partial(tmp_path: Path, monkeypatch):
    dest = tmp_path / "ckpt"
    first, second = build(seed=1), build(seed=2)
    save_model(dest, first, first.args)
    save_model(dest, second, second.args)
    assert torch.equal(load_model(dest)[0].lm_head.weight, second.lm_head.weight)

    def crash(model, path, metadata=None, **options):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "st_save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(dest, first, first.args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(load_model(dest)[0].lm_head.weight, second.lm_head.weight)
    fresh = tmp_path / "new"
    with pytest.raises(OSError):
        save_model(fresh, first, first.args)
    assert not fresh.exists() and not (tmp_path / f"new.tmp-{os.getpid()}").exists()


def test_write_model_files_into_staging_dir(tmp_path: Path):
    m = build()
    with staged_dir(tmp_path / "x") as stage:
        write_model_files(m, m.args, stage, None)
        assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["model.json", "model.safetensors"]


def test_last_only_gives_the_last_positions_logits():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(vocab_size=50, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                              mlp_hidden=64, max_seq_len=16, logit_softcap=5.0)).eval()  # fmt: skip
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        last = m(x, last_only=True)
        hidden = m(x, last_only=True, return_hidden=True)
        full, full_hidden = m(x), m(x, return_hidden=True)
    assert last.shape == (2, 1, 50) and hidden.shape == (2, 1, 32)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden[:, 0], full_hidden[:, -1], rtol=0, atol=1e-6)
