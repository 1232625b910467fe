"""Loading Hugging Face model directories (lmforge.model.hf_import): parity with transformers, built here from tiny
random models of each architecture (no download), and every refusal."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model.hf_import import hf_model_args, load_hf_model, resolve_model_dir  # noqa: E402
from lmforge.model.rope import rope_inv_freq  # noqa: E402
from lmforge.model.transformer import ModelArgs, Transformer  # noqa: E402

VOCAB = 300
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}  # fmt: skip
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)  # fmt: skip
# name -> (config class, its arguments). With head_dim 8 and theta 5e5 the wavelengths are 6.3, 167, 4444 and
# 118000 positions: against llama3's bounds 512 / 4 and 512 / 1 the first is kept, the second blended and the others
# slowed 8 times, so all three rules of the rescaling count (and change logits within 60 positions).
CASES = {
    "llama": ("LlamaConfig", COMMON | {"rope_theta": 500_000.0, "rope_scaling": LLAMA3, "attention_bias": True,
                                       "max_position_embeddings": 4096}),
    "llama_linear": ("LlamaConfig", COMMON | {"rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                              "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", COMMON | {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", COMMON | {"head_dim": 16}),
    "mistral": ("MistralConfig", COMMON | {"sliding_window": 64}),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                initializer_range=0.2)),
}  # fmt: skip
EXPORTED_AS = {"llama": "LlamaForCausalLM", "llama_linear": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mistral": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}  # fmt: skip


def save_hf(directory: Path, case: str, dtype: torch.dtype = torch.float32, **save_kwargs):
    """A random tiny transformers model of `case`, saved (safetensors) to `directory`, and reloaded from there by
    transformers in `dtype` (as a user would load it)."""
    config_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    # (transformers' config classes write rope_theta into the rope dict they are given: give them a copy.)
    config = getattr(transformers, config_cls)(**copy.deepcopy(kwargs))
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def batch(length: int = 60) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_generation_match_transformers(tmp_path, case):
    from lmforge.infer.engine import generate

    hf = save_hf(tmp_path, case)
    model, args = load_hf_model(tmp_path)
    ids = batch()
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    prompt = ids[:1, :10]
    theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 10:].tolist()
    assert generate(model, prompt.tolist(), 20, temperature=0) == [theirs]


def test_architecture_options_are_mapped(tmp_path):
    found = {}
    for case in CASES:
        save_hf(tmp_path / case, case)
        found[case] = load_hf_model(tmp_path / case)[1]
    assert found["llama"].attn_bias == "qkvo" and found["llama"].rope_scaling == LLAMA3
    assert found["llama"].rope_theta == 500_000.0 and not found["llama"].tie_embeddings
    assert found["llama_linear"].rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert found["qwen2"].attn_bias == "qkv" and found["qwen2"].tie_embeddings
    assert found["qwen3"].qk_norm and found["qwen3"].head_dim == 16 and found["qwen3"].attn_bias == "none"
    assert found["mistral"].max_seq_len == 64  # clamped to the sliding window
    assert found["gpt2"].arch == "gpt2" and found["gpt2"].mlp == "gelu" and found["gpt2"].max_seq_len == 128


def test_rope_scaling_frequencies_equal_transformers(tmp_path):
    for case in ("llama", "llama_linear"):
        hf = save_hf(tmp_path / case, case)
        args = load_hf_model(tmp_path / case)[1]
        ours = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        assert torch.equal(ours, hf.model.rotary_emb.inv_freq)
        plain = rope_inv_freq(args.head_dim, args.rope_theta)
        assert not torch.equal(ours, plain)
    assert torch.equal(ours, plain / 4)  # linear
    llama3 = rope_inv_freq(8, 500_000.0, LLAMA3)
    plain = rope_inv_freq(8, 500_000.0)
    assert llama3[0] == plain[0] and torch.equal(llama3[2:], plain[2:] / 8) and plain[1] / 8 < llama3[1] < plain[1]


def test_transformers_4_rope_fields_read_like_5(tmp_path):
    """A transformers 4.x config.json (rope_theta + rope_scaling, legacy "type") gives the same model as 5.x's
    rope_parameters."""
    v5 = {"model_type": "llama", **COMMON, "rope_parameters": {**LLAMA3, "rope_theta": 500_000.0}}
    v4 = {"model_type": "llama", **COMMON, "rope_theta": 500_000.0, "rope_scaling": LLAMA3}
    assert hf_model_args(v5, tmp_path) == hf_model_args(v4, tmp_path)
    legacy = {"model_type": "llama", **COMMON, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert hf_model_args(legacy, tmp_path).rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(("case", "dtype"), [("qwen2", torch.bfloat16), ("llama", torch.float16),
                                             ("gpt2", torch.bfloat16)])  # fmt: skip
def test_sharded_half_precision_keeps_its_dtype(tmp_path, case, dtype):
    hf = save_hf(tmp_path, case, dtype, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = load_hf_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ids = batch()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.dtype == dtype
    # The same operations in the same dtype as transformers: bit-equal, except that GPT-2's gelu_new rounds each
    # of its steps in bf16 where lmforge's tanh GELU rounds once (one bf16 step at these magnitudes).
    assert (ours.float() - theirs.float()).abs().max().item() <= (0.05 if case == "gpt2" else 0.0)
    as_fp32, _ = load_hf_model(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.lm_head.weight, model.lm_head.weight.float())


def _mapped_file(address: int) -> str | None:
    """The file whose memory mapping holds `address` in this process, if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return rest[4] if len(rest) > 4 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_weights_are_memory_mapped_and_tied_embeddings_stay_tied(tmp_path):
    save_hf(tmp_path, "qwen2")
    model, _ = load_hf_model(tmp_path)
    weight = model.model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    assert _mapped_file(weight.data_ptr()) == str((tmp_path / "model.safetensors").resolve())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == len(model.state_dict()) - 1  # the tied table is one parameter
    with torch.no_grad():  # copy-on-write: training may update the weights, the file stays as it was
        weight.add_(1.0)
    assert torch.equal(load_hf_model(tmp_path)[0].model.layers[0].mlp.up_proj.weight, before)
    save_hf(tmp_path / "gpt2", "gpt2")  # Conv1D weights: transposed views of the mapped file, not copies
    up = load_hf_model(tmp_path / "gpt2")[0].model.layers[0].mlp.up_proj.weight
    assert _mapped_file(up.data_ptr()) == str((tmp_path / "gpt2" / "model.safetensors").resolve())


@pytest.mark.parametrize("case", list(CASES))
def test_import_then_export_gives_transformers_the_same_model(tmp_path, case):
    from lmforge.hf import export_hf
    from lmforge.model.io import save_model
    from lmforge.tokenizer import train_tokenizer

    hf = save_hf(tmp_path / "hf", case)
    model, args = load_hf_model(tmp_path / "hf")
    tok = train_tokenizer(iter(["a tiny corpus for a tiny tokenizer"] * 4), vocab_size=VOCAB)
    tok.save(tmp_path / "tok.json")
    save_model(tmp_path / "ckpt", model, args, tmp_path / "tok.json")
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [EXPORTED_AS[case]]
    if case == "llama":
        assert config["attention_bias"] is True and config["rope_parameters"]["rope_type"] == "llama3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = batch(50)  # within mistral's clamped context
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_long_context_rope_tables_grow_on_demand():
    """A model declaring a 131k context builds 4096 rows of rope tables, not 131k, and grows them (to the same
    values a full table has) only when a sequence reaches further."""
    from lmforge.model.rope import rope_tables

    args = ModelArgs(vocab_size=50, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, head_dim=8, mlp_hidden=32,
                     max_seq_len=131_072, rope_theta=500_000.0, rope_scaling=LLAMA3 | {"factor": 2.0})  # fmt: skip
    model = Transformer(args)
    assert model.rope_cos.shape == (4096, 8)
    cos, sin = model.rope(5000, 3)
    assert model.rope_cos.shape == (8192, 8)
    full_cos, full_sin = rope_tables(8, 8192, 500_000.0, args.rope_scaling)
    assert torch.equal(model.rope_cos, full_cos) and torch.equal(sin, full_sin[5000:5003])


def test_old_model_json_loads_with_the_new_fields_defaulted():
    old = {"vocab_size": 50, "n_layers": 1, "d_model": 16, "n_heads": 2, "n_kv_heads": 2, "head_dim": 8,
           "mlp_hidden": 32, "max_seq_len": 64}  # fmt: skip
    args = ModelArgs.from_dict(old)
    assert args.attn_bias == "none" and args.rope_scaling is None
    assert ModelArgs.from_dict(args.to_dict()) == args
    assert not any(name.endswith("bias") for name in Transformer(args).state_dict())


# (model_type, changed fields, the message's field and value)
REFUSALS = [
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for llama (only 'silu')"),
    ("gemma", {}, "model_type='gemma' is not supported (only llama, mistral, qwen2, qwen3, gpt2)"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='yarn' is not supported for llama (only 'default', 'linear' or 'llama3')"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
    ("llama", {"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor=None"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True is not supported for llama (only False)"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True is not supported for qwen2 (only False)"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types=['full_attention', "
                                                                        "'sliding_attention']"),
    ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "architectures=['LlamaForSequenceClass"),
    ("llama", {"num_attention_heads": None}, "num_attention_heads is missing"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported "
                                                        "for gpt2 (only False)"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True is not supported for gpt2"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu' is not supported for gpt2 (only "
                                              "'gelu_new' or 'gelu_pytorch_tanh')"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights=False"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention=True"),
    ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported for gpt2 (only True)"),
]  # fmt: skip


@pytest.mark.parametrize(("model_type", "changes", "message"), REFUSALS)
def test_unsupported_config_is_refused_naming_field_and_value(tmp_path, model_type, changes, message):
    base = CASES["gpt2" if model_type == "gpt2" else "llama"][1]
    config = {k: v for k, v in ({**base, "model_type": model_type} | changes).items() if v is not None}
    if model_type != "gpt2" and "rope_parameters" in changes:
        config.pop("rope_scaling")
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        hf_model_args(config, tmp_path / "config.json")
    assert str(err.value).startswith(str(tmp_path / "config.json"))


def test_pickle_weights_are_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **COMMON}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail differently")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles.*save_pretrained"):
        load_hf_model(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf(tmp_path, "llama")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    tensors["model.rotary_emb.inv_freq"] = torch.zeros(4)  # a derived buffer: ignored
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]; tensors "
                                         r"config\.json does not call for \['model\.layers\.0\.mlp\.extra\.weight'\]"):
        load_hf_model(tmp_path)
    tensors.pop("model.layers.0.mlp.extra.weight")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight \[3, 32\] \(config\.json implies "
                                         r"\[64, 32\]\)"):
        load_hf_model(tmp_path)


def test_hub_id_not_on_disk_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"never downloads.*`hf download Qwen/Qwen2\.5-0\.5B --local-dir "):
        resolve_model_dir("Qwen/Qwen2.5-0.5B")


def test_hub_id_in_the_local_cache_resolves_and_loads(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--Org--Tiny-Qwen"
    snapshot = repo / "snapshots" / "abc123"
    save_hf(snapshot, "qwen2")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("Org/Tiny-Qwen") == snapshot
    assert resolve_model_dir(str(snapshot)) == snapshot  # a local directory is taken as it is
    assert load_hf_model(resolve_model_dir("Org/Tiny-Qwen"))[1].attn_bias == "qkv"
