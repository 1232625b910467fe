"""Hugging Face export: transformers loads it and agrees with lmforge on logits, greedy text and token ids."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmforge.hf import export_hf
from lmforge.infer.engine import generate
from lmforge.model.io import load_model, save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is needed to check that an export loads")

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "héllo wörld — naïve café",
    "日本語のテキスト ✓ 🚀",
    "x = 12345 ** 2",
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:8]
    tok = train_tokenizer([f.read_text(encoding="utf-8") for f in files] + TEXTS[1:2] * 3, vocab_size=400)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


def checkpoint(tmp: Path, tokenizer_file: Path, **kw) -> tuple[Path, Transformer]:
    args = ModelArgs(**(dict(vocab_size=400, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16,
                             mlp_hidden=128, max_seq_len=64, init_std=0.05, rope_theta=500.0) | kw))
    torch.manual_seed(0)
    model = Transformer(args).eval()
    return save_model(tmp / "ckpt", model, args, tokenizer_path=tokenizer_file), model


GPT2 = {"arch": "gpt2", "mlp": "gelu", "tie_embeddings": True}


def perturbed(model: Transformer) -> Transformer:
    """Non-trivial norm weights and biases (they start at one / zero), so their mapping is checked too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "variant,arch",
    [({}, "LlamaForCausalLM"), ({"tie_embeddings": True}, "LlamaForCausalLM"), ({"n_kv_heads": 2}, "LlamaForCausalLM"),
     ({"n_kv_heads": 1, "tie_embeddings": True}, "LlamaForCausalLM"), ({"qk_norm": True}, "Qwen3ForCausalLM"),
     ({"qk_norm": True, "n_kv_heads": 2, "tie_embeddings": True}, "Qwen3ForCausalLM"), (GPT2, "GPT2LMHeadModel")],
    ids=["untied", "tied", "gqa", "mqa-tied", "qk_norm", "qk_norm-gqa-tied", "gpt2"],
)
def test_transformers_loads_export_and_agrees(tmp_path: Path, tokenizer_file: Path, variant: dict, arch: str):
    if arch == "Qwen3ForCausalLM" and not hasattr(transformers, arch):
        pytest.skip("this transformers has no Qwen3 (added in 4.51)")
    args = ModelArgs(**(dict(vocab_size=400, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16,
                             mlp_hidden=128, max_seq_len=64, init_std=0.05, rope_theta=500.0) | variant))
    torch.manual_seed(0)
    model = perturbed(Transformer(args)).eval()
    ckpt = save_model(tmp_path / "ckpt", model, args, tokenizer_path=tokenizer_file)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    if arch != "GPT2LMHeadModel":
        assert hf.config.num_key_value_heads == model.args.n_kv_heads
    assert hf.config.tie_word_embeddings == model.args.tie_embeddings
    tok = Tokenizer.from_file(tokenizer_file)
    ids = torch.tensor([[tok.bos_id] + tok.encode(TEXTS[0] + TEXTS[2])])
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-4

    prompt = [[tok.bos_id] + tok.encode("def ")]
    ours = generate(model, prompt, 16, temperature=0, eos_id=tok.eos_id)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(1, len(prompt[0]), dtype=torch.long),
                             max_new_tokens=16, do_sample=False)[0, len(prompt[0]):].tolist()
    if tok.eos_id in theirs:
        theirs = theirs[: theirs.index(tok.eos_id)]
    assert ours == theirs and len(ours) > 0


def test_export_files_and_tied_weights(tmp_path: Path, tokenizer_file: Path):
    ckpt, model = checkpoint(tmp_path, tokenizer_file, tie_embeddings=True, n_kv_heads=2)
    out = export_hf(ckpt, tmp_path / "hf", dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
                                "tie_word_embeddings", "vocab_size", "dtype")} == {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64, "rope_theta": 500.0,
        "tie_word_embeddings": True, "vocab_size": 400, "dtype": "bfloat16",
    }
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0}
    loaded = transformers.AutoConfig.from_pretrained(out)
    assert loaded.rope_parameters["rope_theta"] == 500.0 and loaded.rms_norm_eps == 1e-5
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        emb = f.get_tensor("model.embed_tokens.weight")
    assert keys == set(model.state_dict()) - {"lm_head.weight"}
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, model.model.embed_tokens.weight.detach().to(torch.bfloat16))
    # The checkpoint itself is left untouched by a low-precision export.
    assert load_model(ckpt)[0].lm_head.weight.dtype == torch.float32


def test_auto_tokenizer_matches_lmforge(tmp_path: Path, tokenizer_file: Path):
    ckpt, _ = checkpoint(tmp_path, tokenizer_file)
    out = export_hf(ckpt, tmp_path / "hf")
    ours = Tokenizer.from_file(tokenizer_file)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.is_fast
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (0, 1, 2)
    for text in TEXTS + ["  leading spaces\n\ttabs", "<|user|> is text, not a role"]:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        # By default the export prepends BOS, as lmforge's training documents and prompts start with it.
        assert theirs(text)["input_ids"] == [ours.bos_id] + ids
        assert theirs.decode([ours.bos_id] + ids, skip_special_tokens=True) == ours.decode(ids) == text


def test_export_replaces_old_dir_atomically_and_needs_a_tokenizer(tmp_path: Path, tokenizer_file: Path):
    ckpt, _ = checkpoint(tmp_path, tokenizer_file)
    stale = tmp_path / "hf"
    stale.mkdir()
    (stale / "old.bin").write_text("stale")
    export_hf(ckpt, stale)
    assert not (stale / "old.bin").exists() and (stale / "config.json").is_file()
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_hf(ckpt, tmp_path / "hf2")
    with pytest.raises(ValueError, match="dtype"):
        export_hf(ckpt, tmp_path / "hf3", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


@pytest.mark.parametrize(
    "variant,match",
    [({"logit_softcap": 30.0}, "logit_softcap"), ({"mlp": "relu2"}, "mlp='relu2'"),
     (GPT2 | {"mlp": "relu2"}, "mlp='relu2'"), (GPT2 | {"qk_norm": True}, "qk_norm"),
     (GPT2 | {"n_kv_heads": 2}, "n_kv_heads"), (GPT2 | {"logit_softcap": 5.0}, "logit_softcap")],
    ids=["softcap", "relu2", "gpt2-relu2", "gpt2-qk_norm", "gpt2-gqa", "gpt2-softcap"],
)
def test_unrepresentable_options_refuse_to_export(tmp_path: Path, tokenizer_file: Path, variant: dict, match: str):
    ckpt, _ = checkpoint(tmp_path, tokenizer_file, **variant)
    with pytest.raises(ValueError, match=match) as err:
        export_hf(ckpt, tmp_path / "hf")
    assert "model." in str(err.value)  # names the recipe setting to change
    assert not (tmp_path / "hf").exists()
