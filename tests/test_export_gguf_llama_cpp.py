"""GGUF export through llama.cpp itself (llama-cpp-python, skipped when it is not installed: pip builds llama.cpp
from source, about 14 minutes on two cores, docs/export.md): the f32 file's logits and greedy text against
lmforge's for each architecture, token ids, the chat template, and f16 / q8_0 within their rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GGUF_TEXT, LLAMA3_ROPE, gguf_texts, imported_checkpoint, lmforge_logits, sharp_checkpoint
from test_export_gguf import llama_ckpt, tokenizer_path  # noqa: F401  (the same module fixtures)

from lmforge.export_gguf import export_gguf
from lmforge.model.io import load_checkpoint_tokenizer, load_model


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


ARCHS = {"llama-gqa": {}, "llama3-rope": {"rope_scaling": LLAMA3_ROPE}, "llama-biases": {"attn_bias": "qkvo"},
         "qwen3": {"qk_norm": True},
         "qwen2": {"attn_bias": "qkv", "tie_embeddings": True},
         "gpt2": {"arch": "gpt2", "mlp": "gelu", "tie_embeddings": True, "n_kv_heads": 4}}  # fmt: skip


def _ggml_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """ggml's CPU GELU: the tanh approximation read from a table indexed by the input rounded to f16, holding f16."""
    return _TORCH_GELU(x.half().float(), approximate=approximate).half().to(x.dtype)


_TORCH_GELU = torch.nn.functional.gelu


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_computes_lmforges_logits_and_greedy_text(llama_cpp, tokenizer_path, tmp_path, arch, monkeypatch):
    from lmforge.infer.engine import generate

    ckpt = sharp_checkpoint(tmp_path / "ckpt", tokenizer_path, **ARCHS[arch])
    llm = _llama(llama_cpp, export_gguf(ckpt, tmp_path / "m.gguf", "f32"))
    ids = [0, *load_checkpoint_tokenizer(ckpt).encode(GGUF_TEXT)][:100]
    ours = lmforge_logits(ckpt, ids)
    assert ours.std() > 0.3
    theirs = _llama_cpp_logits(llm, ids)
    if arch == "gpt2":  # ggml's f16 GELU table alone moves logits by up to ~2e-3; computed its way, they agree
        np.testing.assert_allclose(theirs, ours, atol=3e-3, rtol=0)
        monkeypatch.setattr(torch.nn.functional, "gelu", _ggml_gelu)
        ours = lmforge_logits(ckpt, ids)
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
    texts = [GGUF_TEXT, Path(json.decoder.__file__).read_text(encoding="utf-8")[:6000], *gguf_texts()[1:40],
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
    ckpt = sharp_checkpoint(tmp_path / "ckpt", tokenizer_path, sharpen=1.0)
    ids = [0, *load_checkpoint_tokenizer(ckpt).encode(GGUF_TEXT)][:100]
    ours = lmforge_logits(ckpt, ids)
    theirs = _llama_cpp_logits(_llama(llama_cpp, export_gguf(ckpt, tmp_path / "m.gguf", dtype), False), ids)
    diff = np.abs(theirs - ours)
    assert diff.max() < max_diff and diff.mean() < mean_diff
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= agree


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_llama_cpp_tokenizes_like_an_imported_tokenizer(llama_cpp, tmp_path, pre):
    ckpt = imported_checkpoint(tmp_path, pre)
    llm = _llama(llama_cpp, export_gguf(ckpt, tmp_path / "m.gguf", "f32"))
    tok = load_checkpoint_tokenizer(ckpt)
    for text in [GGUF_TEXT, *gguf_texts()[1:20], "won't  they'LL 12345 x\r\n\r\n  y"]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False) == tok.encode(text), text[:60]

