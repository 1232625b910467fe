"""Export an lmforge checkpoint as a Hugging Face `LlamaForCausalLM` directory, written as plain files.

The backbone's parameter names already are Llama's, so the weights are copied as they are. transformers is not
needed to export; it is only used by the tests to check that the result loads and agrees.

Tokenizer: the exported fast tokenizer prepends BOS when called with `add_special_tokens=True` (the default),
because every training document started with BOS; `add_special_tokens=False` gives exactly lmforge's
`Tokenizer.encode` ids. Both the tokenizer.json post-processor and `add_bos_token` in tokenizer_config.json say so,
so transformers 4.x (which reads the former) and 5.x (which rebuilds it from the latter) agree. Like lmforge's
tokenizer, it encodes the text of a special token ("<|user|>") as plain text (`split_special_tokens`); chat roles
and BOS are inserted as ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from lmforge.model.io import TOKENIZER, load_model, staged_dir
from lmforge.model.transformer import ModelArgs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fixed by lmforge.tokenizer: the first special tokens always take these ids.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def llama_config(args: ModelArgs, dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, readable by transformers 4.45+ (rope_theta) and 5.x (rope_parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.mlp_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _write_tokenizer(src: Path, out: Path, max_len: int) -> None:
    tok = HFTokenizer.from_file(str(src))
    for token, want in ((BOS, BOS_ID), (EOS, EOS_ID), (PAD, PAD_ID)):
        if tok.token_to_id(token) != want:
            raise ValueError(f"{src}: special token {token} must have id {want}, has {tok.token_to_id(token)}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    tok.save(str(out / "tokenizer.json"))
    specials = [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]
    extra = [t for t in specials if t not in (BOS, EOS, PAD)]
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # lmforge never lets text spell a control token; only ids inserted by code are special.
        "split_special_tokens": True,
        "model_max_length": max_len,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(checkpoint_dir: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Write `out_dir` (atomically) so that `AutoModelForCausalLM.from_pretrained(out_dir)` loads the model."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tokenizer_src = checkpoint_dir / TOKENIZER
    if not tokenizer_src.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no {TOKENIZER}; an export needs the model's tokenizer")
    model, args = load_model(checkpoint_dir)
    state = {
        name: t.to(DTYPES[dtype]).contiguous()
        for name, t in model.state_dict().items()
        if not (args.tie_embeddings and name == "lm_head.weight")
    }
    with staged_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", llama_config(args, dtype))
        generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        _write_json(tmp / "generation_config.json", generation)
        _write_tokenizer(tokenizer_src, tmp, args.max_seq_len)
    log.info("exported %s to %s (Hugging Face Llama, %s)", checkpoint_dir, out_dir, dtype)
    return out_dir
