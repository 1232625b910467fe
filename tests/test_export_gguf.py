"""GGUF export (lmforge.export_gguf): metadata, tensors and values read back with gguf's own reader, a NumPy
forward pass over the file's tensors with llama.cpp's conventions (interleaved rotary pairs for "llama"), and, when
llama-cpp-python is installed, llama.cpp itself: logits, greedy text and token ids against lmforge's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.export_gguf import PRE_TOKENIZERS, export_gguf, gguf_vocab, permute_rope, tensor_type
from lmforge.finetune.template import CHAT_TEMPLATE_JINJA
from lmforge.hf import ExportConfig
from lmforge.model.io import load_checkpoint_tokenizer, load_model, save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.outdir import OutputDirError
from lmforge.tokenizer import SPECIAL_TOKENS, train_tokenizer

INSTRUCT_DATA = Path("/work/shared/data/instruct/alpaca_data_first200.json")
# Real text with what pre-tokenizers disagree on: digits, runs of spaces, newlines with indentation, tabs, CRLF,
# accents, CJK, emoji, right-to-left digits and contractions.
TRICKY = ("def parse(x, y=3.14159):\n    if x >= 2024:\n\t\treturn [1, 22, 333]\r\n    return None  # done\n\n\n"
          "Naïve café in 東京 costs ¥1200 😀! They're here, it's 10:45 — ١٢٣ and ⅷ.   Trailing   spaces   ")  # fmt: skip


def _texts() -> list[str]:
    records = json.loads(INSTRUCT_DATA.read_text(encoding="utf-8"))
    code = Path(json.__file__).read_text(encoding="utf-8")
    return [code] + [" ".join(r[k] for k in ("instruction", "input", "output")) for r in records]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocabulary 1500) trained on code and instruction text."""
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    train_tokenizer(iter(_texts()), vocab_size=1500).save(path)
    return path


def make_checkpoint(directory: Path, tokenizer: Path, sharpen: float = 4.0, **options) -> Path:
    """A small random model whose attention is sharp (q/k weights scaled by `sharpen`), so that a wrong rotary
    layout or a wrong q/k/v split changes the logits by far more than any tolerance below."""
    vocab = load_checkpoint_tokenizer_file(tokenizer).vocab_size
    base = dict(vocab_size=vocab, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=96,
                max_seq_len=128, init_std=0.08)  # fmt: skip
    args = ModelArgs(**(base | options))
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms away from one, so a transposed or misplaced norm shows
                p.uniform_(0.5, 1.5)
    return save_model(directory, model, args, tokenizer)


def load_checkpoint_tokenizer_file(path: Path):
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, tokenizer_path) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", tokenizer_path)


def _fields(path: Path) -> tuple[dict, dict]:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _lmforge_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0].numpy()


def test_metadata_says_what_llama_cpp_needs(llama_ckpt, tokenizer_path, tmp_path):
    out = export_gguf(llama_ckpt, tmp_path / "m.gguf", "f32")
    meta, tensors = _fields(out)
    spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    tok = load_checkpoint_tokenizer(llama_ckpt)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert {k: meta[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
            "attention.head_count", "attention.head_count_kv", "attention.key_length", "rope.dimension_count",
            "vocab_size")} == {"context_length": 128, "embedding_length": 64, "block_count": 2,
            "feed_forward_length": 96, "attention.head_count": 4, "attention.head_count_kv": 2,
            "attention.key_length": 16, "rope.dimension_count": 16, "vocab_size": tok.vocab_size}  # fmt: skip
    assert meta["llama.rope.freq_base"] == 10000.0 and meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
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
    _, tensors = _fields(export_gguf(llama_ckpt, tmp_path / "m.gguf", "f32"))
    state = {k: v.numpy() for k, v in load_model(llama_ckpt)[0].state_dict().items()}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]  # fmt: skip
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight",
                            *(f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer)}  # fmt: skip
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors.values())
    same = {"token_embd": "model.embed_tokens", "output": "lm_head", "blk.1.attn_v": "model.layers.1.self_attn.v_proj",
            "blk.1.ffn_down": "model.layers.1.mlp.down_proj", "blk.0.ffn_norm": "model.layers.0.post_attention_layernorm"}
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
    _, f32 = _fields(export_gguf(llama_ckpt, tmp_path / "f32.gguf", "f32"))
    _, f16 = _fields(export_gguf(llama_ckpt, tmp_path / "f16.gguf", "f16"))
    _, q8 = _fields(export_gguf(llama_ckpt, tmp_path / "q8.gguf", "q8_0"))
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
    meta, tensors = _fields(path)
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


@pytest.mark.parametrize("options", [{}, {"attn_bias": "qkvo", "tie_embeddings": True},
                                     {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}],
                         ids=["gqa", "biases-tied", "llama3-rope"])  # fmt: skip
def test_llama_file_computes_lmforges_logits_with_interleaved_rope(tokenizer_path, tmp_path, options):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_path, **options)
    path = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    ids = [0, *load_checkpoint_tokenizer(ckpt).encode(TRICKY)][:100]
    ours = _lmforge_logits(ckpt, ids)
    assert ours.std() > 0.3  # logits that vary, so the comparison below means something
    np.testing.assert_allclose(numpy_llama_forward(path, ids), ours, atol=2e-4, rtol=0)
    if options.get("rope_scaling"):
        assert _fields(path)[1]["rope_freqs.weight"].tensor_type == GGMLQuantizationType.F32


@pytest.mark.parametrize(("options", "arch", "extra", "missing"), [
    ({"qk_norm": True}, "qwen3", {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}, set()),
    ({"attn_bias": "qkv"}, "qwen2", {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"}, set()),
    ({"arch": "gpt2", "mlp": "gelu", "tie_embeddings": True, "n_kv_heads": 4}, "gpt2",
     {"position_embd.weight", "output_norm.bias", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "blk.0.ffn_up.bias"},
     {"output.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate.weight"}),
])  # fmt: skip
def test_each_architecture_gets_llama_cpps_names(tokenizer_path, tmp_path, options, arch, extra, missing):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_path, **options)
    meta, tensors = _fields(export_gguf(ckpt, tmp_path / "m.gguf", "q8_0"))
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
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_path, **options)
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


def test_a_prefix_tuned_checkpoint_is_refused(llama_ckpt, tmp_path):
    import shutil

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
    assert _fields(out)[0]["general.file_type"] == 7
    result = CliRunner().invoke(app, ["export", str(llama_ckpt), str(tmp_path / "x.gguf"), "--format", "gguf",
                                      "--dtype", "float16"])  # fmt: skip
    assert result.exit_code == 2
    assert "dtype 'float16' does not go with format 'gguf' (float16 is a hf dtype): format gguf takes f32 | f16 | q8_0" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["export", str(llama_ckpt), str(tmp_path / "hf"), "--dtype", "q8_0"])
    assert result.exit_code == 2 and "format hf takes float32 | bfloat16 | float16" in " ".join(result.output.split())
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()
    for outs in ([], [str(out), "-o", str(out)]):  # the output exactly once
        result = CliRunner().invoke(app, ["export", str(llama_ckpt), *outs, "--format", "gguf"])
        assert result.exit_code == 2 and "give the output once" in result.output
    assert ExportConfig(format="gguf").dtype == "f32" and ExportConfig().semantic() == {"format": "hf", "dtype": "float32"}
    with pytest.raises(ValueError, match="dtype 'bfloat16' does not go with format 'gguf'"):
        ExportConfig(format="gguf", dtype="bfloat16")


def test_the_export_stage_writes_model_gguf_with_its_dtype(llama_ckpt, tmp_path):
    from lmforge.hf import EXPORT_STAGE
    from lmforge.recipe import load_recipe
    from lmforge.verbs import run_stage

    settings = load_recipe(None, ["export.format=gguf", "export.dtype=f16"])
    metrics = run_stage(EXPORT_STAGE, settings, tmp_path, model=llama_ckpt)
    assert metrics == {"path": str(tmp_path / "model.gguf"), "bytes": (tmp_path / "model.gguf").stat().st_size}
    assert _fields(tmp_path / "model.gguf")[0]["general.file_type"] == 1  # mostly f16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


# llama.cpp itself, through llama-cpp-python (built from source by pip: docs/export.md says how long it takes).


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def _llama(llama_cpp, path: Path, f32_cache: bool = True):
    """A llama.cpp context with every position's logits; f32_cache keeps keys and values in float32 (llama.cpp's
    default f16 cache rounds them, which alone moves logits by about 1e-3)."""
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=1, flash_attn=False, verbose=False,
                           **cache)  # fmt: skip


def _llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


ARCHS = {"llama-gqa": {}, "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, "qwen3": {"qk_norm": True},
         "qwen2": {"attn_bias": "qkv", "tie_embeddings": True},
         "gpt2": {"arch": "gpt2", "mlp": "gelu", "tie_embeddings": True, "n_kv_heads": 4}}  # fmt: skip


def _ggml_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """ggml's CPU GELU: the tanh approximation read from a table indexed by the input rounded to f16, holding f16."""
    return _TORCH_GELU(x.half().float(), approximate=approximate).half().to(x.dtype)


_TORCH_GELU = torch.nn.functional.gelu


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_computes_lmforges_logits_and_greedy_text(llama_cpp, tokenizer_path, tmp_path, arch, monkeypatch):
    from lmforge.infer.engine import generate

    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_path, **ARCHS[arch])
    llm = _llama(llama_cpp, export_gguf(ckpt, tmp_path / "m.gguf", "f32"))
    ids = [0, *load_checkpoint_tokenizer(ckpt).encode(TRICKY)][:100]
    ours = _lmforge_logits(ckpt, ids)
    assert ours.std() > 0.3
    theirs = _llama_cpp_logits(llm, ids)
    if arch == "gpt2":  # ggml's f16 GELU table alone moves logits by up to ~2e-3; computed its way, they agree
        np.testing.assert_allclose(theirs, ours, atol=3e-3, rtol=0)
        monkeypatch.setattr(torch.nn.functional, "gelu", _ggml_gelu)
        ours = _lmforge_logits(ckpt, ids)
        monkeypatch.undo()
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)
    prompt = ids[:12]
    want = generate(load_model(ckpt)[0].eval(), [prompt], 24, temperature=0.0)[0]
    llm.reset()
    llm.eval(prompt)
    got = []
    for _ in range(24):  # one token at a time through llama.cpp's KV cache
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    assert got == want


def test_llama_cpp_tokenizes_like_lmforge(llama_cpp, llama_ckpt, tmp_path):
    llm = _llama(llama_cpp, export_gguf(llama_ckpt, tmp_path / "m.gguf", "f32"))
    tok = load_checkpoint_tokenizer(llama_ckpt)
    texts = [TRICKY, Path(json.decoder.__file__).read_text(encoding="utf-8")[:6000], *_texts()[1:40],
             "<|user|>text that spells a control token<|end|>", "1234567890 ½ ²³ x²", " \n \n\n   \t"]  # fmt: skip
    for text in texts:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False) == ids, text[:60]
        assert llm.tokenize(text.encode("utf-8")) == [tok.bos_id, *ids]  # add_bos_token: the training convention
        assert llm.detokenize(ids).decode("utf-8") == text


def test_the_files_chat_template_gives_lmforges_prompt_ids_in_llama_cpp(llama_cpp, llama_ckpt, tmp_path):
    """The Jinja template stored in the file (what llama-cli --jinja and llama-cpp-python render) tokenized by
    llama.cpp with special tokens parsed: the ids lmforge's chat template gives the same conversation."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lmforge.finetune.data import Message

    llm = _llama(llama_cpp, export_gguf(llama_ckpt, tmp_path / "m.gguf", "f32"))
    conversation = [Message("system", "Be brief."), Message("user", "Name 3 colours, e.g. 'red'.")]
    render = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|eos|>", bos_token="<|bos|>")
    prompt = render(messages=[{"role": m.role, "content": m.content} for m in conversation]).prompt
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    assert ids == load_checkpoint_tokenizer(llama_ckpt).chat_template.prompt_ids(conversation)
    assert llm.token_eos() == 1 and ids[-1] == 5  # <|assistant|>


@pytest.mark.parametrize(("dtype", "max_diff", "mean_diff", "agree"), [("f16", 0.01, 0.002, 0.98),
                                                                      ("q8_0", 0.15, 0.025, 0.85)])  # fmt: skip
def test_llama_cpp_runs_f16_and_q8_0_close_to_lmforge(llama_cpp, tokenizer_path, tmp_path, dtype, max_diff, mean_diff,
                                                      agree):  # fmt: skip
    """Looser than f32, by what rounding costs: f16 keeps 11 significant bits of each weight and llama.cpp multiplies
    in f16; q8_0 rounds each weight to 1/254 of its block's largest and llama.cpp rounds the activations to 8 bits
    too. On this model (logits' standard deviation ~0.7) that moves logits by ~0.0005 (f16) and ~0.012 (q8_0) on
    average, at most ~0.004 and ~0.08 (measured); the bounds leave about 2x. The argmax of a random model has
    near-ties, so q8_0 may flip a few."""
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer_path, sharpen=1.0)
    ids = [0, *load_checkpoint_tokenizer(ckpt).encode(TRICKY)][:100]
    ours = _lmforge_logits(ckpt, ids)
    theirs = _llama_cpp_logits(_llama(llama_cpp, export_gguf(ckpt, tmp_path / "m.gguf", dtype), False), ids)
    diff = np.abs(theirs - ours)
    assert diff.max() < max_diff and diff.mean() < mean_diff
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= agree
