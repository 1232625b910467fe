"""GGUF export (lmforge.export_gguf): metadata, tensors and values read back with gguf's own reader, a NumPy
forward pass over the file's tensors with llama.cpp's conventions (interleaved rotary pairs for "llama"), the
refusals, the output file, the CLI and the export stage. llama.cpp itself: tests/test_export_gguf_llama_cpp.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from helpers import (GGUF_TEXT, LLAMA3_ROPE, gguf_fields, gguf_tokenizer, imported_checkpoint, lmforge_logits,
                     sharp_checkpoint)
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.export_gguf import PRE_TOKENIZERS, export_gguf, gguf_vocab, permute_rope, tensor_type
from lmforge.finetune.template import CHAT_TEMPLATE_JINJA
from lmforge.hf import ExportConfig
from lmforge.model.io import load_checkpoint_tokenizer, load_model
from lmforge.outdir import OutputDirError
from lmforge.tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return gguf_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, tokenizer_path) -> Path:
    return sharp_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", tokenizer_path)


def test_metadata_says_what_llama_cpp_needs(llama_ckpt, tokenizer_path, tmp_path):
    out = export_gguf(llama_ckpt, tmp_path / "m.gguf", "f32")
    meta, tensors = gguf_fields(out)
    spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    tok = load_checkpoint_tokenizer(llama_ckpt)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert {k: meta[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
            "attention.head_count", "attention.head_count_kv", "attention.key_length", "rope.dimension_count",
            "vocab_size")} == {"context_length": 128, "embedding_length": 64, "block_count": 2,
            "feed_forward_length": 96, "attention.head_count": 4, "attention.head_count_kv": 2,
            "attention.key_length": 16, "rope.dimension_count": 16, "vocab_size": tok.vocab_size}  # fmt: skip
    assert meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == tok.vocab_size
    assert all(tokens[i] == t for t, i in spec["model"]["vocab"].items())
    assert tokens[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    types = meta["tokenizer.ggml.token_type"]
    assert set(types[: len(SPECIAL_TOKENS)]) == {3} and set(types[len(SPECIAL_TOKENS):]) == {1}  # control, normal
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding", "eot")] == [0, 1, 2, 6]
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE_JINJA
    assert meta["lmforge.export"] == 1


def test_f32_tensors_are_the_weights_under_llama_cpp_names(llama_ckpt, tmp_path):
    _, tensors = gguf_fields(export_gguf(llama_ckpt, tmp_path / "m.gguf", "f32"))
    state = {k: v.numpy() for k, v in load_model(llama_ckpt)[0].state_dict().items()}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]  # fmt: skip
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight",
                            *(f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer)}  # fmt: skip
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors.values())
    same = {"token_embd": "model.embed_tokens", "output": "lm_head", "blk.1.attn_v": "model.layers.1.self_attn.v_proj",
            "blk.1.ffn_down": "model.layers.1.mlp.down_proj",
            "blk.0.ffn_norm": "model.layers.0.post_attention_layernorm"}  # fmt: skip
    for theirs, ours in same.items():
        np.testing.assert_array_equal(np.asarray(tensors[f"{theirs}.weight"].data), state[f"{ours}.weight"])
    assert tuple(tensors["blk.0.ffn_gate.weight"].shape) == (64, 96)  # GGUF lists dims innermost first
    q, k = (np.asarray(tensors[f"blk.0.attn_{n}.weight"].data) for n in "qk")
    np.testing.assert_array_equal(q, permute_rope(state["model.layers.0.self_attn.q_proj.weight"], 4))
    np.testing.assert_array_equal(k, permute_rope(state["model.layers.0.self_attn.k_proj.weight"], 2))
    # within each head, row i moves to 2i and row i + head_dim/2 to 2i + 1
    np.testing.assert_array_equal(k[16 + 2 * 3], state["model.layers.0.self_attn.k_proj.weight"][16 + 3])
    np.testing.assert_array_equal(k[16 + 2 * 3 + 1], state["model.layers.0.self_attn.k_proj.weight"][16 + 8 + 3])


def test_f16_and_q8_0_round_trip_within_their_error(llama_ckpt, tmp_path):
    _, f32 = gguf_fields(export_gguf(llama_ckpt, tmp_path / "f32.gguf", "f32"))
    _, f16 = gguf_fields(export_gguf(llama_ckpt, tmp_path / "f16.gguf", "f16"))
    _, q8 = gguf_fields(export_gguf(llama_ckpt, tmp_path / "q8.gguf", "q8_0"))
    for name, t in f32.items():
        exact = np.asarray(t.data)
        if exact.ndim == 1:  # norms stay float32 in every export
            assert f16[name].tensor_type == q8[name].tensor_type == GGMLQuantizationType.F32
            continue
        assert f16[name].tensor_type == GGMLQuantizationType.F16
        np.testing.assert_array_equal(np.asarray(f16[name].data), exact.astype(np.float16))
        assert q8[name].tensor_type == GGMLQuantizationType.Q8_0
        back = dequantize(np.asarray(q8[name].data), GGMLQuantizationType.Q8_0).reshape(exact.shape)
        # q8_0: blocks of 32 values share a scale d = max|x| / 127 (stored as f16), each value rounds to d * int8:
        # off by at most d / 2, plus the f16 rounding of d times up to 127
        d = np.abs(exact.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(back - exact).reshape(-1, 32) <= d * (0.5 + 127 * 2**-11) + 1e-12).all(), name
        assert np.abs(back - exact).max() > 0  # it is quantised


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16():
    assert tensor_type("blk.0.ffn_up.weight", np.zeros((8, 48), np.float32), "q8_0") == GGMLQuantizationType.F16
    assert tensor_type("blk.0.ffn_up.weight", np.zeros((8, 64), np.float32), "q8_0") == GGMLQuantizationType.Q8_0
    assert tensor_type("position_embd.weight", np.zeros((8, 64), np.float32), "q8_0") == GGMLQuantizationType.F32
    assert tensor_type("output_norm.bias", np.zeros(64, np.float32), "f16") == GGMLQuantizationType.F32


def _interleaved_rope(x: np.ndarray, theta: float, freq_factors: np.ndarray | None) -> np.ndarray:
    """llama.cpp's "llama" rotary embedding (adjacent pairs 2i, 2i + 1) on x [T, H, D]."""
    T, _, D = x.shape
    freqs = theta ** (-np.arange(0, D, 2) / D)
    if freq_factors is not None:
        freqs = freqs / freq_factors
    angle = np.arange(T)[:, None] * freqs[None, :]  # [T, D/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def numpy_llama_forward(path: Path, ids: list[int]) -> np.ndarray:
    """Logits of a "llama" GGUF file, computed from its tensors and metadata alone, as llama.cpp computes them."""
    meta, tensors = gguf_fields(path)
    w = {name: np.asarray(t.data, dtype=np.float64) for name, t in tensors.items()}
    H, KV, eps = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta[
        "llama.attention.layer_norm_rms_epsilon"]  # fmt: skip
    theta, factors = meta["llama.rope.freq_base"], w.get("rope_freqs.weight")

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    x = w["token_embd.weight"][ids]
    T = len(ids)
    for i in range(meta["llama.block_count"]):
        b = f"blk.{i}."
        h = rms(x, w[b + "attn_norm.weight"])
        q, k, v = (h @ w[b + f"attn_{n}.weight"].T + w.get(b + f"attn_{n}.bias", 0) for n in "qkv")
        q = _interleaved_rope(q.reshape(T, H, -1), theta, factors)
        k = np.repeat(_interleaved_rope(k.reshape(T, KV, -1), theta, factors), H // KV, axis=1)
        v = np.repeat(v.reshape(T, KV, -1), H // KV, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        attn = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(T, -1)
        x = x + attn @ w[b + "attn_output.weight"].T + w.get(b + "attn_output.bias", 0)
        h = rms(x, w[b + "ffn_norm.weight"])
        gate = h @ w[b + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
    out = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ out.T


@pytest.mark.parametrize("options", [{}, {"attn_bias": "qkvo", "tie_embeddings": True}, {"rope_scaling": LLAMA3_ROPE}],
                         ids=["gqa", "biases-tied", "llama3-rope"])  # fmt: skip
def test_llama_file_computes_lmforges_logits_with_interleaved_rope(tokenizer_path, tmp_path, options):
    ckpt = sharp_checkpoint(tmp_path / "ckpt", tokenizer_path, **options)
    path = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    ids = [0, *load_checkpoint_tokenizer(ckpt).encode(GGUF_TEXT)][:100]
    ours = lmforge_logits(ckpt, ids)
    assert ours.std() > 0.3  # logits that vary, so the comparison below means something
    np.testing.assert_allclose(numpy_llama_forward(path, ids), ours, atol=2e-4, rtol=0)
    if options.get("rope_scaling"):
        assert gguf_fields(path)[1]["rope_freqs.weight"].tensor_type == GGMLQuantizationType.F32


def test_a_hugging_face_model_directory_exports_too(llama_ckpt, tmp_path):
    """lmforge's own Hugging Face export, read back as any Hugging Face model (imported on the fly), gives the same
    GGUF model, with the template and stop token its tokenizer files name."""
    from lmforge.hf import export_hf

    path = export_gguf(export_hf(llama_ckpt, tmp_path / "hf"), tmp_path / "m.gguf", "f32")
    ids = [0, *load_checkpoint_tokenizer(llama_ckpt).encode(GGUF_TEXT)][:100]
    np.testing.assert_allclose(numpy_llama_forward(path, ids), lmforge_logits(llama_ckpt, ids), atol=2e-4, rtol=0)
    meta, _ = gguf_fields(path)
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE_JINJA and meta["tokenizer.ggml.eot_token_id"] == 6
    assert meta["tokenizer.ggml.tokens"] == gguf_fields(export_gguf(llama_ckpt, tmp_path / "n.gguf"))[0][
        "tokenizer.ggml.tokens"]  # fmt: skip


@pytest.mark.parametrize(("options", "arch", "extra", "missing"), [
    ({"qk_norm": True}, "qwen3", {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}, set()),
    ({"attn_bias": "qkv"}, "qwen2", {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"}, set()),
    ({"arch": "gpt2", "mlp": "gelu", "tie_embeddings": True, "n_kv_heads": 4}, "gpt2",
     {"position_embd.weight", "output_norm.bias", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "blk.0.ffn_up.bias"},
     {"output.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate.weight"}),
])  # fmt: skip
def test_each_architecture_gets_llama_cpps_names(tokenizer_path, tmp_path, options, arch, extra, missing):
    ckpt = sharp_checkpoint(tmp_path / "ckpt", tokenizer_path, **options)
    meta, tensors = gguf_fields(export_gguf(ckpt, tmp_path / "m.gguf", "q8_0"))
    assert meta["general.architecture"] == arch
    assert extra <= set(tensors) and not missing & set(tensors)
    state = {k: v.numpy() for k, v in load_model(ckpt)[0].state_dict().items()}
    if arch == "gpt2":
        qkv = np.concatenate([state[f"model.layers.1.self_attn.{n}_proj.bias"] for n in "qkv"])
        np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_qkv.bias"].data), qkv)
        assert tensors["position_embd.weight"].tensor_type == GGMLQuantizationType.F32
    else:  # rotate-half architectures: q is copied as is
        back = dequantize(np.asarray(tensors["blk.1.attn_q.weight"].data), GGMLQuantizationType.Q8_0)
        np.testing.assert_allclose(back, state["model.layers.1.self_attn.q_proj.weight"], atol=0.02)


@pytest.mark.parametrize(("options", "named"), [
    ({"logit_softcap": 30.0}, "logit_softcap=30.0"), ({"mlp": "relu2"}, "mlp='relu2'"),
    ({"arch": "gpt2", "mlp": "relu2", "tie_embeddings": True}, "mlp='relu2' with arch=gpt2"),
])  # fmt: skip
def test_what_llama_cpp_cannot_compute_is_refused(tokenizer_path, tmp_path, options, named):
    ckpt = sharp_checkpoint(tmp_path / "ckpt", tokenizer_path, **options)
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


def test_a_prefix_tuned_checkpoint_is_refused(llama_ckpt, tmp_path):
    ckpt = Path(shutil.copytree(llama_ckpt, tmp_path / "ckpt"))
    (ckpt / "prefix").mkdir()
    (ckpt / "prefix" / "prefix.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="is prefix-tuned: llama.cpp has no learned key/value prefix"):
        export_gguf(ckpt, tmp_path / "m.gguf")


def test_sentencepiece_style_and_unknown_pre_tokenizers_are_refused(tokenizer_path, tmp_path):
    spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    fallback = tmp_path / "sp.json"
    fallback.write_text(json.dumps(spec | {"model": spec["model"] | {"byte_fallback": True}}), encoding="utf-8")
    with pytest.raises(ValueError, match="only byte-level BPE tokenizers .* byte_fallback=True"):
        gguf_vocab(fallback, 1500)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(spec | {"pre_tokenizer": {"type": "Whitespace"}}), encoding="utf-8")
    with pytest.raises(ValueError, match='pre_tokenizer {"type": "Whitespace"} has no llama.cpp equivalent'):
        gguf_vocab(odd, 1500)
    vocab = gguf_vocab(tokenizer_path, 1600)  # a model with spare rows: unused tokens
    assert vocab.tokens[-1] == "<|unused_1599|>" and vocab.types[-100:] == [5] * 100
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps(spec | {"pre_tokenizer": PRE_TOKENIZERS["gpt-2"][0] | {"trim_offsets": True}}))
    assert gguf_vocab(gpt2, 1500).pre == "gpt-2"


def test_output_file_is_written_atomically_and_never_over_a_users_file(llama_ckpt, tmp_path):
    with pytest.raises(OutputDirError, match="is a folder; give the GGUF file's name"):
        export_gguf(llama_ckpt, tmp_path)
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"not lmforge's")
    with pytest.raises(OutputDirError, match="already exists and lmforge did not export it"):
        export_gguf(llama_ckpt, mine)
    assert mine.read_bytes() == b"not lmforge's"
    out = export_gguf(llama_ckpt, tmp_path / "m.gguf", "f16")
    first = out.read_bytes()
    export_gguf(llama_ckpt, out, "q8_0")  # an earlier export is replaced
    assert out.stat().st_size < len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "mine.gguf"]  # no temporary file left


def test_cli_and_recipe_pair_each_format_with_its_dtypes(llama_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(app, ["export", str(llama_ckpt), "-o", str(out), "--format", "gguf", "--dtype", "q8_0"])
    assert result.exit_code == 0, result.output
    assert gguf_fields(out)[0]["general.file_type"] == 7
    result = CliRunner().invoke(app, ["export", str(llama_ckpt), str(tmp_path / "x.gguf"), "--format", "gguf",
                                      "--dtype", "float16"])  # fmt: skip
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert ("dtype 'float16' does not go with format 'gguf' (float16 is a hf dtype): format gguf takes f32 | f16 | "
            "q8_0") in message
    result = CliRunner().invoke(app, ["export", str(llama_ckpt), str(tmp_path / "hf"), "--dtype", "q8_0"])
    assert result.exit_code == 2 and "format hf takes float32 | bfloat16 | float16" in " ".join(result.output.split())
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()
    for outs in ([], [str(out), "-o", str(out)]):  # the output exactly once
        result = CliRunner().invoke(app, ["export", str(llama_ckpt), *outs, "--format", "gguf"])
        assert result.exit_code == 2 and "give the output once" in result.output
    assert ExportConfig(format="gguf").dtype == "f32"
    assert ExportConfig().semantic() == {"format": "hf", "dtype": "float32"}  # the default run's fingerprint is kept
    with pytest.raises(ValueError, match="dtype 'bfloat16' does not go with format 'gguf'"):
        ExportConfig(format="gguf", dtype="bfloat16")


def test_the_export_stage_writes_model_gguf_with_its_dtype(llama_ckpt, tmp_path):
    from lmforge.hf import EXPORT_STAGE
    from lmforge.recipe import load_recipe
    from lmforge.verbs import run_stage

    settings = load_recipe(None, ["export.format=gguf", "export.dtype=f16"])
    metrics = run_stage(EXPORT_STAGE, settings, tmp_path, model=llama_ckpt)
    assert metrics == {"path": str(tmp_path / "model.gguf"), "bytes": (tmp_path / "model.gguf").stat().st_size}
    assert gguf_fields(tmp_path / "model.gguf")[0]["general.file_type"] == 1  # mostly f16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_an_imported_tokenizer_gets_llama_cpps_name_for_its_pre_tokenizer(tmp_path, pre):
    meta, _ = gguf_fields(export_gguf(imported_checkpoint(tmp_path, pre), tmp_path / "m.gguf", "f32"))
    assert meta["tokenizer.ggml.pre"] == pre
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos")] == [0, 0]  # no BOS: documents start at EOS
    assert "tokenizer.chat_template" not in meta  # it has none
