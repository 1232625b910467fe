"""Export an lmforge checkpoint as a Hugging Face causal-LM directory, written as plain files.

Which architecture the export takes follows the model's options (`hf_architecture`):

    arch=llama, mlp=swiglu               -> LlamaForCausalLM (the parameter names already are Llama's: copied as is;
                                            attn_bias=qkvo is attention_bias=true; rope_scaling kept)
    ... with attn_bias=qkv               -> Qwen2ForCausalLM (q/k/v biases; copied as is)
    arch=llama, mlp=swiglu, qk_norm      -> Qwen3ForCausalLM (Llama plus q_norm / k_norm over head_dim; copied as is;
                                            needs transformers >= 4.51 to load)
    arch=gpt2 (GELU MLP, no GQA)         -> GPT2LMHeadModel (q/k/v fused into c_attn, weights transposed for Conv1D)

Options no Hugging Face architecture computes exactly (logit_softcap, the relu2 MLP, qk_norm with gpt2 arch, ...)
raise ValueError naming the option and the setting to change, rather than writing a model that disagrees.
transformers is not needed to export; it is only used by the tests to check that the result loads and agrees.

Tokenizer: the exported fast tokenizer prepends BOS when called with `add_special_tokens=True` (the default),
because every training document started with BOS; `add_special_tokens=False` gives exactly lmforge's
`Tokenizer.encode` ids. Both the tokenizer.json post-processor and `add_bos_token` in tokenizer_config.json say so,
so transformers 4.x (which reads the former) and 5.x (which rebuilds it from the latter) agree.

Chat: tokenizer_config.json carries lmforge's chat template (`CHAT_TEMPLATE_JINJA`), so `apply_chat_template`
gives exactly the ids `lmforge.finetune.template` renders, and generation_config.json lists `<|end|>` beside EOS,
so `generate` stops where an assistant turn ends. A Hugging Face chat template renders text that is then
tokenized, which works only if the text of a special token ("<|user|>") becomes that token: the export therefore
keeps transformers' default `split_special_tokens=False`, whereas lmforge's own tokenizer never lets text spell a
control token. To encode untrusted text as lmforge does, pass `split_special_tokens=True` to the tokenizer, or
`sanitize_control_tokens=True` to `apply_chat_template` (transformers versions that have it).

An imported model's tokenizer (lmforge.tokenizer: `Tokenizer.from_dir`) is exported as its own files, as read: its
tokenizer.json, special tokens and chat template, with generation_config.json's eos_token_id listing every id that
ends a reply (its EOS ids and its template's end-of-turn token).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import typer
from pydantic import model_validator
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from lmforge import verbs
from lmforge.export_gguf import GGUF_DTYPES, export_gguf
from lmforge.finetune.template import CHAT_TEMPLATE_JINJA, END
from lmforge.io import staged_dir
from lmforge.model.io import TOKENIZER, has_prefix, load_checkpoint_tokenizer, load_model, require_checkpoint
from lmforge.model.transformer import ModelArgs
from lmforge.outdir import claim_output_dir, write_marker
from lmforge.registry import ReportContext, Stage, StageContext, producer, register
from lmforge.settings import Section
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_DTYPES = {"hf": tuple(DTYPES), "gguf": GGUF_DTYPES}  # format -> its dtypes, the first the default
GGUF_FILE = "model.gguf"  # the export stage's GGUF file


def check_export_dtype(fmt: str, dtype: str) -> None:
    """ValueError naming both when `dtype` is not one of format `fmt`'s dtypes."""
    if dtype not in EXPORT_DTYPES[fmt]:
        other = [f for f, dtypes in EXPORT_DTYPES.items() if dtype in dtypes]
        hint = f" ({dtype} is a {other[0]} dtype)" if other else ""
        raise ValueError(f"dtype {dtype!r} does not go with format {fmt!r}{hint}: format {fmt} takes "
                         f"{' | '.join(EXPORT_DTYPES[fmt])}")  # fmt: skip


class ExportConfig(Section):
    # hf: a Hugging Face transformers directory; gguf: one llama.cpp file (docs/export.md)
    format: Literal["hf", "gguf"] = "hf"
    # hf: float32 | bfloat16 | float16; gguf: f32 | f16 | q8_0 (unset with format gguf: f32)
    dtype: Literal["float32", "bfloat16", "float16", "f32", "f16", "q8_0"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _format_default_dtype(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" not in data and data.get("format") in EXPORT_DTYPES:
            return {**data, "dtype": EXPORT_DTYPES[data["format"]][0]}
        return data

    @model_validator(mode="after")
    def _dtype_fits_format(self) -> ExportConfig:
        check_export_dtype(self.format, self.dtype)
        return self

# Fixed by lmforge.tokenizer: the first special tokens always take these ids.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BOS_ID, EOS_ID, PAD_ID, END_ID = 0, 1, 2, 6
FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja")  # everything an export writes (and its lmforge.outdir marker)


def hf_architecture(args: ModelArgs) -> str:
    """"llama", "qwen2", "qwen3" or "gpt2": the Hugging Face architecture that computes exactly what this model does.

    Raises ValueError naming the option (and the setting to change) when there is none.
    """
    if args.logit_softcap is not None:
        raise ValueError(
            f"logit_softcap={args.logit_softcap} cannot be exported: no Hugging Face architecture of this layout caps "
            "logits with cap * tanh(logits / cap); train with model.logit_softcap=null to export"
        )
    if args.arch == "gpt2":
        if args.mlp != "gelu":
            raise ValueError(
                f"mlp={args.mlp!r} with arch=gpt2 cannot be exported: GPT2LMHeadModel's MLP is GELU; train with "
                "model.mlp=swiglu (which gives the gpt2 arch its GELU MLP) to export"
            )
        if args.qk_norm:
            raise ValueError(
                "qk_norm with arch=gpt2 cannot be exported: GPT2LMHeadModel has no query/key norm; set "
                "model.qk_norm=false, or use model.arch=llama (which exports qk_norm as Qwen3)"
            )
        if args.n_kv_heads != args.n_heads:
            raise ValueError(
                f"n_kv_heads={args.n_kv_heads} < n_heads={args.n_heads} with arch=gpt2 cannot be exported: "
                "GPT2LMHeadModel has no grouped-query attention; leave model.n_kv_heads unset"
            )
        if args.n_heads * args.head_dim != args.d_model:
            raise ValueError(f"arch=gpt2 export needs n_heads * head_dim == d_model, got {args.n_heads} * "
                             f"{args.head_dim} != {args.d_model}")
        return "gpt2"
    if args.mlp != "swiglu":
        raise ValueError(
            f"mlp={args.mlp!r} with arch=llama cannot be exported: Llama and Qwen3 have a gated SiLU MLP and no "
            "Hugging Face architecture matches an ungated one with RMSNorm and rotary positions exactly; train with "
            "model.mlp=swiglu (or model.arch=gpt2 for an ungated GELU MLP) to export"
        )
    if args.qk_norm and args.attn_bias == "qkv":
        raise ValueError(
            "qk_norm with attn_bias='qkv' cannot be exported: Qwen3ForCausalLM's attention_bias puts a bias on o_proj "
            "too, and Qwen2ForCausalLM has no q/k norm; no Hugging Face architecture computes this model exactly"
        )
    if args.qk_norm:
        return "qwen3"
    return "qwen2" if args.attn_bias == "qkv" else "llama"


def _token_and_dtype_fields(dtype: str, tok: Tokenizer) -> dict[str, Any]:
    """The config.json fields every exported architecture shares: special token ids, cache, weight dtype."""
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def llama_config(args: ModelArgs, dtype: str, tok: Tokenizer) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, readable by transformers 4.45+ (rope_theta, rope_scaling) and 5.x
    (rope_parameters)."""
    rope_type = args.rope_scaling["rope_type"] if args.rope_scaling else "default"
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
        "rope_scaling": args.rope_scaling,
        "rope_parameters": {**(args.rope_scaling or {}), "rope_type": rope_type, "rope_theta": args.rope_theta},
        "hidden_act": "silu",
        "attention_bias": args.attn_bias == "qkvo",
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "tie_word_embeddings": args.tie_embeddings,
        **_token_and_dtype_fields(dtype, tok),
    }


def qwen2_config(args: ModelArgs, dtype: str, tok: Tokenizer) -> dict[str, Any]:
    """config.json for Qwen2ForCausalLM: Llama's fields (Qwen2's q/k/v biases are implied), no sliding window."""
    cfg = qwen3_config(args, dtype, tok)
    cfg.pop("attention_bias")
    return cfg | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


def qwen3_config(args: ModelArgs, dtype: str, tok: Tokenizer) -> dict[str, Any]:
    """config.json for Qwen3ForCausalLM: Llama's fields plus per-head q_norm / k_norm, no sliding window."""
    cfg = llama_config(args, dtype, tok)
    cfg.pop("mlp_bias")
    return cfg | {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.n_layers,
        "layer_types": ["full_attention"] * args.n_layers,
    }


def gpt2_config(args: ModelArgs, dtype: str, tok: Tokenizer) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel (tanh GELU = "gelu_new", no dropout, 1/sqrt(head_dim) attention scale)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": args.vocab_size,
        "n_positions": args.max_seq_len,
        "n_embd": args.d_model,
        "n_layer": args.n_layers,
        "n_head": args.n_heads,
        "n_inner": args.mlp_hidden,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": args.norm_eps,
        "initializer_range": args.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        **_token_and_dtype_fields(dtype, tok),
    }


def gpt2_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename lmforge's gpt2-arch weights to GPT2LMHeadModel's; Conv1D stores [in, out], so matrices transpose."""
    out = {
        "transformer.wte.weight": state["model.embed_tokens.weight"],
        "transformer.wpe.weight": state["model.embed_positions.weight"],
        "transformer.ln_f.weight": state["model.norm.weight"],
        "transformer.ln_f.bias": state["model.norm.bias"],
    }
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[dst + theirs + ".weight"] = state[src + ours + ".weight"]
            out[dst + theirs + ".bias"] = state[src + ours + ".bias"]
        qkv = [src + f"self_attn.{n}_proj" for n in "qkv"]
        out[dst + "attn.c_attn.weight"] = torch.cat([state[n + ".weight"] for n in qkv], dim=0).t()
        out[dst + "attn.c_attn.bias"] = torch.cat([state[n + ".bias"] for n in qkv], dim=0)
        for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            out[dst + theirs + ".weight"] = state[src + ours + ".weight"].t()
            out[dst + theirs + ".bias"] = state[src + ours + ".bias"]
    return {name: t.contiguous() for name, t in out.items()}


def _write_tokenizer(ours: Tokenizer, src: Path, out: Path, max_len: int) -> None:
    """The export's tokenizer files: an imported model's own, or lmforge's (`ours`, read from `src`) with the
    BOS post-processor and chat template transformers needs."""
    if ours.imported is not None:  # an imported model's own files, as read
        ours.save_dir(out)
        return
    tok = HFTokenizer.from_file(str(src))
    for token, want in ((BOS, BOS_ID), (EOS, EOS_ID), (PAD, PAD_ID), (END, END_ID)):
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
        # The chat template's rendered text must turn "<|user|>" into the role token (see the module docstring).
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE_JINJA,
        "model_max_length": max_len,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(checkpoint_dir: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Write `out_dir` (atomically) so that `AutoModelForCausalLM.from_pretrained(out_dir)` loads the model.

    The new folder replaces the old one as a whole, so `out_dir` must be new, empty or an earlier export holding
    nothing but the export's FILES (else lmforge.outdir.OutputDirError, naming the other files)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    checkpoint_dir, out_dir = require_checkpoint(checkpoint_dir), Path(out_dir)
    tokenizer_src = checkpoint_dir / TOKENIZER
    if not tokenizer_src.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no {TOKENIZER}; an export needs the model's tokenizer")
    if has_prefix(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} is prefix-tuned: its prefix/ holds key/values that no transformers "
                         "architecture loads, and exporting the weights alone would silently drop the tuning. Export "
                         "a full or LoRA fine-tune (LoRA is merged into the weights) instead")  # fmt: skip
    model, args = load_model(checkpoint_dir)
    tok = load_checkpoint_tokenizer(checkpoint_dir)
    arch = hf_architecture(args)
    claim_output_dir(out_dir, "export", replaces=FILES)  # the swap below replaces the whole folder
    state = {
        name: t.to(DTYPES[dtype]).contiguous()
        for name, t in model.state_dict().items()
        if not (args.tie_embeddings and name == "lm_head.weight")
    }
    if arch == "gpt2":
        state, config = gpt2_state_dict(state, args), gpt2_config(args, dtype, tok)
    elif arch == "qwen3":
        config = qwen3_config(args, dtype, tok)
    elif arch == "qwen2":
        config = qwen2_config(args, dtype, tok)
    else:
        config = llama_config(args, dtype, tok)
    with staged_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_tokenizer(tok, tokenizer_src, tmp, args.max_seq_len)
        # Every id that ends a reply, so that transformers' generate stops where lmforge's does: lmforge's <|end|>
        # (SFT puts EOS after it only at the end of a whole conversation), an imported template's end of turn.
        # An imported model's other generation settings stay.
        generation = json.loads(tok.imported.files.get("generation_config.json", "{}")) if tok.imported else {}
        generation |= {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids, "pad_token_id": tok.pad_id}
        _write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        write_marker(tmp, "export")
    log.info("exported %s to %s (Hugging Face %s, %s)", checkpoint_dir, out_dir, config["architectures"][0], dtype)
    return out_dir


def load_causal_lm(path: Path, device: torch.device) -> torch.nn.Module:
    """A transformers causal-LM directory (an export, or any model transformers loads) in float32 on `device`,
    in eval mode: what evaluation scores and what generate and chat run for an export."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise RuntimeError(f"reading a transformers model directory needs transformers: pip install transformers "
                           f"({e})") from e  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()


def _export_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.settings.export
    if cfg.format == "gguf":
        path = export_gguf(ctx.input("model"), ctx.out / GGUF_FILE, dtype=cfg.dtype)
        return {"path": str(path), "bytes": path.stat().st_size}
    path = export_hf(ctx.input("model"), ctx.out / "hf", dtype=cfg.dtype)
    return {"path": str(path), "bytes": sum(p.stat().st_size for p in path.iterdir())}


def _export_config(settings: Any) -> dict[str, Any]:
    """The export settings and which model is exported: a recipe that adds fine-tuning exports another model."""
    return {**settings.export.semantic(), "model": producer("model", EXPORT_STAGE, list(settings.stages)).name}


def _export_report(ctx: ReportContext) -> list[str]:
    if (ctx.stage_dir / GGUF_FILE).exists():
        gguf = (ctx.stage_dir / GGUF_FILE).relative_to(ctx.root)
        return ["## Export", "", f"GGUF file: `{gguf}` (runs with llama.cpp: `llama-cli -m {gguf} --jinja`).", ""]
    if not (ctx.stage_dir / "hf").exists():
        return []
    return ["## Export", "", f"Hugging Face directory: `{(ctx.stage_dir / 'hf').relative_to(ctx.root)}` (loads with "
            "`AutoModelForCausalLM`).", ""]  # fmt: skip


def export_verb(
    checkpoint: Path = typer.Argument(..., help="A model: an lmforge checkpoint, a Hugging Face model "
                                      "directory, or a hub id in the local cache."),
    out: Path | None = typer.Argument(None, help="Output: hf, a directory (new, empty, or an earlier export, which "
                                      "it replaces); gguf, a file (new, or an earlier GGUF export)."),
    out_option: Path | None = typer.Option(None, "-o", "--out", help="The output, given as an option instead."),
    fmt: str = typer.Option("hf", "--format", help="hf (a Hugging Face transformers directory) | gguf (one "
                            "llama.cpp file)."),
    dtype: str | None = typer.Option(None, help="hf: float32 | bfloat16 | float16 (default float32); gguf: f32 | "
                                     "f16 | q8_0 (default f32)."),
) -> None:
    """Export a checkpoint to a Hugging Face transformers directory, with its tokenizer and chat template. The
    architecture follows the model: LlamaForCausalLM; Qwen3ForCausalLM for a model with qk_norm (the default
    recipe's; needs transformers >= 4.51); GPT2LMHeadModel for model.arch=gpt2. With --format gguf: one GGUF file
    for llama.cpp (llama, qwen2, qwen3 or gpt2 architecture), tokenizer and chat template included."""
    if fmt not in EXPORT_DTYPES:
        verbs.fail(f"--format {fmt!r} is not supported; allowed: {' | '.join(EXPORT_DTYPES)}", 2)
    if (out is None) == (out_option is None):
        verbs.fail("give the output once: as the second argument or as -o OUT", 2)
    out = out if out is not None else out_option
    dtype = dtype or EXPORT_DTYPES[fmt][0]
    try:
        check_export_dtype(fmt, dtype)
    except ValueError as e:
        verbs.fail(f"--dtype: {e}", 2)
    with verbs.output_checked():
        if fmt == "gguf":
            path = export_gguf(checkpoint, out, dtype=dtype)
            log.info("exported to %s; run it with llama.cpp: llama-cli -m %s --jinja", path, path)
            return
        path = export_hf(checkpoint, out, dtype=dtype)
    log.info("exported to %s; load with AutoModelForCausalLM.from_pretrained(%r)", path, str(path))


# Exports the latest model of the recipe: the fine-tuned one when the recipe fine-tunes (the model a user chats
# with), else the pre-trained one.
EXPORT_STAGE = register(Stage(
    name="export", order=70, run=_export_stage, sections={"export": ExportConfig}, needs=("model",),
    config=_export_config, produces={"hf": "hf", "gguf": GGUF_FILE}, report=_export_report, verb=export_verb,
))  # fmt: skip
