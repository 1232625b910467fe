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


def tiny_chat_model(directory: Path) -> Path:
    """A tiny untied 2-block model with a tokenizer (vocabulary 512, chat tokens reserved) trained on the instruction
    data itself, saved as a checkpoint in directory/ckpt."""
    import json

    import torch

    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import train_tokenizer

    records = json.loads(Path(INSTRUCT_DATA).read_text(encoding="utf-8"))
    texts = [" ".join(r[k] for k in ("instruction", "input", "output")) for r in records]
    tok = train_tokenizer(iter(texts), vocab_size=512)
    tok.save(directory / "tok.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16,
                     mlp_hidden=128, max_seq_len=128)  # fmt: skip
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
