"""Data the training tests share."""

import argparse
from pathlib import Path

import numpy as np


class ByteSplit:
    """Real text as tokens: the bytes of a standard-library source file (vocab 256)."""

    def __init__(self) -> None:
        self.tokens = np.frombuffer(Path(argparse.__file__).read_bytes(), dtype=np.uint8).astype(np.int64)
        self.n_tokens = len(self.tokens)

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


def json_package_run(root: Path) -> Path:
    """Curate, tokenizer (vocabulary 400) and token shards of the standard library's json package, in root/d."""
    from lmforge.data.readers import stdlib_root
    from lmforge.pipeline import run_recipe
    from lmforge.recipe import load_recipe

    recipe = load_recipe(None, [f"data.source={stdlib_root() / 'json'}", "data.val_fraction=0.3", "data.near_dedup=false",
                                "data.pii=false", "tokenizer.vocab_size=400", f"run_dir={root}", "name=d",
                                "stages=[curate, tokenizer, shards]"])  # fmt: skip
    run_recipe(recipe)
    return root / "d"


def make_chain(model, chain: dict[int, int]):
    """Rewire `model` in place so its greedy choice after token t is chain[t], and return it: both residual
    branches are zeroed, so the last hidden state is the normalised embedding of the current token, and each
    lm_head row points at its predecessor's embedding (the model needs init_std large enough to separate them)."""
    import torch

    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        emb = model.model.embed_tokens.weight
        for t, nxt in chain.items():
            model.lm_head.weight[nxt] += 10 * emb[t] / emb[t].norm()
    return model


INSTRUCT_DATA = "/work/shared/data/instruct/alpaca_data_first200.json"


def tiny_chat_model(directory: Path, **model_args) -> Path:
    """A tiny untied 2-block model with a tokenizer (vocabulary 512, chat tokens reserved) trained on the instruction
    data itself, saved as a checkpoint in directory/ckpt; `model_args` override its ModelArgs."""
    import json

    import torch

    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import train_tokenizer

    records = json.loads(Path(INSTRUCT_DATA).read_text(encoding="utf-8"))
    texts = [" ".join(r[k] for k in ("instruction", "input", "output")) for r in records]
    tok = train_tokenizer(iter(texts), vocab_size=512)
    tok.save(directory / "tok.json")
    args = ModelArgs(**{"vocab_size": tok.vocab_size, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 4,
                        "head_dim": 16, "mlp_hidden": 128, "max_seq_len": 128} | model_args)  # fmt: skip
    torch.manual_seed(0)
    return save_model(directory / "ckpt", Transformer(args), args, directory / "tok.json")


def sft_on_file(checkpoint: Path, data, out: Path, train, **settings) -> dict:
    """The sft stage's function (what `lmforge sft` runs) on a data file: `train` (a TrainConfig) as sft.train,
    `settings` the other sft.* settings; no greedy generations before and after unless gen_prompts is given."""
    from lmforge.finetune.config import SFTConfig
    from lmforge.finetune.stage import run_sft

    cfg = SFTConfig(data=str(data), **{"gen_prompts": 0, **settings}, train=train.model_dump())
    return run_sft(checkpoint, None, cfg, out)


# Chat templates in the styles of real model families, written for the tests (issue 15: imported tokenizers).
CHATML_TEMPLATE = (  # Qwen2/2.5/3 style: no BOS, a default system message, <|im_end|> ends a turn
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Llama 3 style: BOS, role headers, contents trimmed, <|eot_id|> ends a turn
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '[INST] ' + message['content'] + ' [/INST]' }}
{% elif message['role'] == 'assistant' %}
{{ message['content'] + eos_token }}
{% else %}
{{ raise_exception('Only user and assistant roles are supported!') }}
{% endif %}
{% endfor %}"""
# style -> (special tokens, bos, eos, pad, chat template)
HF_STYLES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3_TEMPLATE),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None, MISTRAL_TEMPLATE),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, None),
}


def hf_tokenizer_dir(directory: Path, style: str) -> Path:
    """A tiny byte-level BPE (vocabulary 700, trained on standard-library text) saved by transformers'
    save_pretrained in `style` (HF_STYLES), as a model directory would hold it; generation_config.json lists the
    Llama-3-style end-of-turn id too."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmforge.data.readers import stdlib_root

    specials, bos, eos, pad, template = HF_STYLES[style]
    text = (stdlib_root() / "textwrap.py").read_text(encoding="utf-8").splitlines()[:400]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    hf.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)  # fmt: skip
    fast.save_pretrained(directory)
    if style == "llama3":
        ids = [hf.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}), encoding="utf-8")
    return directory


def tiny_hf_chat_model(directory: Path, style: str = "chatml", family: str = "qwen2", dtype=None) -> Path:
    """A tiny random Hugging Face model of `family` (qwen2 or llama) with hf_tokenizer_dir's `style` tokenizer and
    chat template, saved in `directory` by transformers (safetensors, in `dtype`; default fp32) as a hub download
    would hold it."""
    import torch
    import transformers

    hf_tokenizer_dir(directory, style)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    config_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[family]
    config = config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(dtype or torch.float32).save_pretrained(directory)
    return directory


# The GGUF export tests (tests/test_export_gguf*.py).

# Real text with what pre-tokenizers disagree on: digits, runs of spaces, newlines with indentation, tabs, CRLF,
# accents, CJK, emoji, Arabic-Indic digits, a roman numeral and contractions.
GGUF_TEXT = ("def parse(x, y=3.14159):\n    if x >= 2024:\n\t\treturn [1, 22, 333]\r\n    return None  # done\n\n\n"
             "Naïve café in 東京 costs ¥1200 😀! They're here, it's 10:45 — ١٢٣ and ⅷ.   Trailing   spaces   ")  # fmt: skip

# Llama 3.1's rope scaling with an original context of 16 positions, so that a 100-token test sequence reaches the
# rescaled frequencies.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip


def gguf_texts() -> list[str]:
    """Real text: the json package's source (json/__init__.py), then the 200 Alpaca records as text."""
    import json

    records = json.loads(Path(INSTRUCT_DATA).read_text(encoding="utf-8"))
    code = Path(json.__file__).read_text(encoding="utf-8")
    return [code] + [" ".join(r[k] for k in ("instruction", "input", "output")) for r in records]


def gguf_tokenizer(directory: Path) -> Path:
    """lmforge's byte-level BPE (vocabulary 1500) trained on gguf_texts, saved as directory/tok.json."""
    from lmforge.tokenizer import train_tokenizer

    train_tokenizer(iter(gguf_texts()), vocab_size=1500).save(directory / "tok.json")
    return directory / "tok.json"


def sharp_checkpoint(directory: Path, tokenizer: Path, sharpen: float = 4.0, **options) -> Path:
    """A small random model (ModelArgs `options` on top of a 2-block GQA llama) whose attention is sharp (q/k
    weights scaled by `sharpen`) and whose norms are away from one, so that a wrong rotary layout, q/k/v split or
    norm placement changes the logits by far more than any export test's tolerance."""
    import torch

    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import Tokenizer

    base = dict(vocab_size=Tokenizer.from_file(tokenizer).vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                head_dim=16, mlp_hidden=96, max_seq_len=128, init_std=0.08)  # fmt: skip
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
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return save_model(directory, model, args, tokenizer)


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """A GGUF file's metadata (key -> value) and tensors (name -> gguf's ReaderTensor)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def lmforge_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    """lmforge's logits [T, vocab] of one sequence."""
    import torch

    from lmforge.model.io import load_model

    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0].float().numpy()


def hf_style_tokenizer(directory: Path, pre: str) -> Path:
    """A byte-level BPE tokenizer as Hugging Face models ship them (no lmforge special tokens; `pre` names the
    pre-tokenizer of PRE_TOKENIZERS: Llama 3's or Qwen2's regex split, or GPT-2's), with its tokenizer_config.json."""
    import json

    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.export_gguf import PRE_TOKENIZERS

    steps = PRE_TOKENIZERS[pre]
    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=steps[-1]["use_regex"])
    split = [pre_tokenizers.Split(Regex(steps[0]["Regex"]), "isolated")] if len(steps) == 2 else []
    hf.pre_tokenizer = pre_tokenizers.Sequence([*split, byte_level]) if split else byte_level
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    hf.train_from_iterator(gguf_texts(), trainer=trainer)
    directory.mkdir(parents=True)
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}), encoding="utf-8")
    return directory / "tokenizer.json"


def imported_checkpoint(directory: Path, pre: str) -> Path:
    """A sharp_checkpoint in directory/ckpt with an hf_style_tokenizer (`pre`) and its tokenizer_config.json."""
    tokenizer = hf_style_tokenizer(directory / "tok", pre)
    ckpt = sharp_checkpoint(directory / "ckpt", tokenizer)
    (ckpt / "tokenizer_config.json").write_bytes((directory / "tok" / "tokenizer_config.json").read_bytes())
    return ckpt



CHROMIUM_INSTALL = "scripts/install_chromium.sh (or, as root: apt-get install chromium chromium-driver)"


def chromium_driver(downloads: Path | None = None):
    """Debian's headless Chromium under Selenium (a 1280x900 window; files it downloads go to `downloads`). Skips the
    test when chromium or chromedriver is not on PATH, except under CI (env CI set), where that fails the test: CI
    installs them (scripts/install.sh --dev) and must run the browser tests."""
    import os
    import shutil

    import pytest

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        missing = "chromium and chromedriver are not both on PATH; install them with " + CHROMIUM_INSTALL
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium refuses to start as root (CI containers) with its sandbox; it only loads our loopback app
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})  # fmt: skip
    return webdriver.Chrome(service=Service(driver_path), options=options)


def wait_for(condition, what: str, timeout: float = 10.0):
    """Poll `condition()` every 50 ms until it returns something truthy (returned) or `timeout` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if found := condition():
                return found
        except Exception:  # noqa: BLE001 - a page mid-navigation: its elements go stale; look again
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
