"""Export an lmforge checkpoint as one GGUF file that llama.cpp (llama-cli, llama-server, llama-cpp-python) runs.

Which llama.cpp architecture the file declares follows the model's options (`gguf_architecture`):

    arch=llama, mlp=swiglu            -> "llama"  (q/k weights and biases permuted, see `permute_rope`; o_proj
                                                   bias with attn_bias=qkvo; rope_scaling as a rope_freqs tensor)
    ... with attn_bias=qkv            -> "qwen2"  (q/k/v biases, rotate-half rope as lmforge: nothing permuted)
    ... with qk_norm                  -> "qwen3"  (per-head attn_q_norm / attn_k_norm, rotate-half rope)
    arch=gpt2 (GELU MLP)              -> "gpt2"   (q/k/v fused into attn_qkv, learned positions, LayerNorm biases)

Options llama.cpp does not compute (logit_softcap, the relu2 MLP, qk_norm with arch=gpt2, a prefix-tuned checkpoint)
are refused with a ValueError naming the option, rather than writing a file that disagrees with the model.

Rotary layout: lmforge (like Hugging Face) rotates the two halves of each head, dimension i with i + head_dim/2;
llama.cpp's "llama" architecture rotates adjacent pairs (2i, 2i + 1). Reordering the rows of each head of q_proj and
k_proj so that row i goes to 2i and row i + head_dim/2 to 2i + 1 makes the two compute the same attention scores (the
dot product of q and k is unchanged by the same reordering of both). "qwen3" rotates halves, so nothing is permuted.

Weights (`dtype`): f32 keeps every tensor in float32; f16 and q8_0 convert the matrices and keep what llama.cpp's
own converter keeps in float32: 1-D tensors (norms, biases) and the learned position table. A q8_0 matrix whose
rows are not a multiple of 32 (the block size) is stored as f16 instead, as that converter does.

Tokenizer: the byte-level BPE of `tokenizer.json` as tokenizer.ggml.model "gpt2" (tokens, merges, token types with
the special tokens as control tokens), with the llama.cpp pre-tokenizer that splits text as the tokenizer's own
pre-tokenizer does (`PRE_TOKENIZERS`), BOS added to every prompt (lmforge trained every document after a BOS),
EOS, PAD, the chat template (lmforge's, or an imported model's own) and its end-of-turn token (`<|end|>` for
lmforge's). SentencePiece-style tokenizers (byte fallback, Metaspace) are refused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.finetune.template import CHAT_TEMPLATE_JINJA
from lmforge.io import atomic_path
from lmforge.model.io import TOKENIZER, has_prefix, load_checkpoint_tokenizer, load_model, require_checkpoint
from lmforge.model.rope import rope_inv_freq
from lmforge.model.transformer import ModelArgs

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "q8_0")
# Written into every export, so that exporting again may replace an earlier export but never another GGUF file.
MARKER_KEY = "lmforge.export"

# The pre-tokenizers llama.cpp implements that lmforge's tokenizers (and the Hugging Face ones of the same family)
# use: tokenizer.json's pre_tokenizer -> llama.cpp's tokenizer.ggml.pre. "smollm" is "each digit on its own, then the
# GPT-2 regex" (lmforge's own, SmolLM's), without llama.cpp's clean-up of spaces before punctuation on decoding.
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    "smollm": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL],
    "gpt-2": [_GPT2_BYTE_LEVEL],
    "llama-bpe": [{"type": "Split", "Regex": _LLAMA3_REGEX}, _GPT2_BYTE_LEVEL | {"use_regex": False}],
    "qwen2": [{"type": "Split", "Regex": _QWEN2_REGEX}, _GPT2_BYTE_LEVEL | {"use_regex": False}],
}


def gguf_architecture(args: ModelArgs) -> str:
    """"llama", "qwen3" or "gpt2": the llama.cpp architecture that computes exactly what this model does.

    Raises ValueError naming the option (and the setting to change) when there is none."""
    if args.logit_softcap is not None:
        raise ValueError(f"logit_softcap={args.logit_softcap} cannot be exported to GGUF: llama.cpp's llama, qwen2, "
                         "qwen3 and gpt2 do not cap logits; train with model.logit_softcap=null to export")  # fmt: skip
    if args.arch == "gpt2":
        if args.mlp != "gelu":
            raise ValueError(f"mlp={args.mlp!r} with arch=gpt2 cannot be exported to GGUF: llama.cpp's gpt2 MLP is "
                             "GELU; train with model.mlp=swiglu (which gives the gpt2 arch its GELU MLP)")  # fmt: skip
        if args.qk_norm:
            raise ValueError("qk_norm with arch=gpt2 cannot be exported to GGUF: llama.cpp's gpt2 has no query/key "
                             "norm; set model.qk_norm=false, or use model.arch=llama (exported as qwen3)")  # fmt: skip
        if args.n_heads * args.head_dim != args.d_model:
            raise ValueError(f"arch=gpt2 GGUF export needs n_heads * head_dim == d_model (llama.cpp's gpt2 attention "
                             f"output is d_model square), got {args.n_heads} * {args.head_dim} != {args.d_model}")
        return "gpt2"
    if args.mlp != "swiglu":
        raise ValueError(f"mlp={args.mlp!r} with arch=llama cannot be exported to GGUF: llama.cpp's llama and qwen3 "
                         "have a gated SiLU MLP; train with model.mlp=swiglu to export")  # fmt: skip
    if args.qk_norm:
        if args.attn_bias != "none" or args.rope_scaling is not None:
            raise ValueError(f"qk_norm with attn_bias={args.attn_bias!r} or rope_scaling={args.rope_scaling} cannot "
                             "be exported to GGUF: llama.cpp's qwen3 has neither")  # fmt: skip
        return "qwen3"
    square = args.n_heads * args.head_dim == args.d_model  # llama.cpp's qwen2 has a d_model-square attention output
    return "qwen2" if args.attn_bias == "qkv" and args.rope_scaling is None and square else "llama"


def permute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q or k projection [n_heads * head_dim, d_in] (or its bias) reordered per head from the rotate-half
    layout (pairs i, i + head_dim/2) to the interleaved one (pairs 2i, 2i + 1) that llama.cpp's llama uses."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(state: dict[str, np.ndarray], args: ModelArgs, arch: str) -> dict[str, np.ndarray]:
    """lmforge's float32 weights under llama.cpp's tensor names, in llama.cpp's layouts. A tied lm_head is left
    out: llama.cpp then reads token_embd for the output layer."""
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = state["model.embed_positions.weight"]
        out["output_norm.bias"] = state["model.norm.bias"]
    if not args.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    if arch != "gpt2":
        names |= {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                if f"{src}{ours}.{kind}" in state:
                    out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
        if arch == "gpt2":  # one fused projection, rows q then k then v
            for kind in ("weight", "bias"):
                qkv = [state[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"]
                out[f"{dst}attn_qkv.{kind}"] = np.concatenate(qkv, axis=0)
        if arch == "llama":
            for name in [n for n in out if n.startswith((dst + "attn_q.", dst + "attn_k."))]:
                out[name] = permute_rope(out[name], args.n_heads if ".attn_q." in name else args.n_kv_heads)
    if args.rope_scaling is not None:  # llama.cpp divides each rotary frequency by its factor
        plain, scaled = (rope_inv_freq(args.head_dim, args.rope_theta, s) for s in (None, args.rope_scaling))
        out["rope_freqs.weight"] = (plain / scaled).numpy()
    return out


def tensor_type(name: str, array: np.ndarray, dtype: str) -> Any:
    """The GGML type `name` is stored in for the export `dtype`; 1-D tensors and the position table stay float32,
    q8_0 falls back to f16 for rows that are not a whole number of blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if dtype == "f32" or array.ndim == 1 or name == "position_embd.weight":
        return GGMLQuantizationType.F32
    if dtype == "q8_0" and array.shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def _add_hparams(writer: Any, args: ModelArgs, arch: str, vocab_size: int) -> None:
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.d_model)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.mlp_hidden)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_vocab_size(vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(args.norm_eps)
        return
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)


@dataclass(frozen=True)
class GGUFVocab:
    """What tokenizer.ggml.* holds for a byte-level BPE tokenizer."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def _pre_tokenizer_name(spec: dict[str, Any] | None, path: Path) -> str:
    steps = (spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]) if spec else []
    for name, want in PRE_TOKENIZERS.items():
        if len(steps) == len(want) and all(_matches(step, part) for step, part in zip(steps, want)):
            return name
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(spec)} has no llama.cpp equivalent that lmforge knows "
                     f"(known: {', '.join(PRE_TOKENIZERS)}); convert the original model with llama.cpp's "
                     "convert_hf_to_gguf.py instead")  # fmt: skip


def _matches(step: dict[str, Any], want: dict[str, Any]) -> bool:
    if "Regex" in want:  # a Split step: each match of the pattern becomes a piece of its own
        return (step.get("type") == "Split" and step.get("pattern") == {"Regex": want["Regex"]}
                and step.get("behavior") == "Isolated" and not step.get("invert"))  # fmt: skip
    return all(step.get(key, value) == value for key, value in want.items())


def gguf_vocab(path: Path, n_vocab: int) -> GGUFVocab:
    """The tokenizer.json at `path` as GGUF vocabulary, padded with unused tokens to the model's `n_vocab` rows."""
    from gguf import TokenType

    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ValueError(f"{path}: only byte-level BPE tokenizers (GPT-2 style: lmforge's, SmolLM, Llama 3, Qwen2) are "
                         f"exported to GGUF; this one is model {model.get('type')!r}, byte_fallback="
                         f"{model.get('byte_fallback')}, decoder {decoder.get('type')!r} (a "
                         "SentencePiece-style tokenizer such as Llama 2's or Mistral v0.1's): convert the original "
                         "model with llama.cpp's convert_hf_to_gguf.py instead")  # fmt: skip
    if spec.get("normalizer") not in (None, {"type": "NFC"}):  # llama.cpp normalises nothing; NFC text is unchanged
        raise ValueError(f"{path}: normalizer {json.dumps(spec['normalizer'])} is not applied by llama.cpp; only "
                         "tokenizers without one (or NFC) are exported to GGUF")  # fmt: skip
    by_id = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    missing = sorted(set(range(max(by_id) + 1)) - set(by_id))
    if missing or len(by_id) > n_vocab:
        raise ValueError(f"{path}: token ids must be 0..{n_vocab - 1} without gaps (the model's vocabulary); "
                         f"{len(by_id)} tokens, missing ids {missing[:5]}")  # fmt: skip
    tokens = [by_id[i][0] for i in range(len(by_id))] + [f"<|unused_{i}|>" for i in range(len(by_id), n_vocab)]
    types = [int(by_id[i][1]) for i in range(len(by_id))] + [int(TokenType.UNUSED)] * (n_vocab - len(by_id))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return GGUFVocab(tokens, types, merges, _pre_tokenizer_name(spec.get("pre_tokenizer"), path))


def _add_tokenizer(writer: Any, checkpoint_dir: Path, n_vocab: int) -> None:
    vocab = gguf_vocab(checkpoint_dir / TOKENIZER, n_vocab)
    tok = load_checkpoint_tokenizer(checkpoint_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    # lmforge starts every document and prompt with this token (BOS, or EOS for a tokenizer without BOS), so
    # llama.cpp is told to add it as its BOS.
    writer.add_bos_token_id(tok.doc_start_id)
    writer.add_add_bos_token(True)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_eos_token(False)
    writer.add_pad_token_id(tok.pad_id)
    if tok.has_chat_template:
        writer.add_chat_template(CHAT_TEMPLATE_JINJA if tok.imported is None else tok.imported.chat_template)
        turn = tok.chat_template.end_of_turn_ids
        if turn:  # a chat reply ends there (<|end|> for lmforge's template): llama.cpp stops generating
            writer.add_eot_token_id(turn[0])


def _check_output(out_path: Path) -> None:
    """`out_path` may be new or an earlier GGUF export of lmforge's; anything else is refused (OutputDirError)."""
    from gguf import GGUFReader

    from lmforge.outdir import OutputDirError

    if out_path.is_dir():
        raise OutputDirError(f"{out_path} is a folder; give the GGUF file's name (e.g. {out_path / 'model.gguf'})")
    if not out_path.exists():
        return
    try:
        ours = MARKER_KEY in GGUFReader(out_path).fields
    except (ValueError, OSError):  # not a GGUF file at all
        ours = False
    if not ours:
        raise OutputDirError(f"{out_path} already exists and lmforge did not export it; choose another file name, or "
                             "move it away")  # fmt: skip


def export_gguf(checkpoint_dir: Path, out_path: Path, dtype: str = "f32") -> Path:
    """Write the checkpoint as one GGUF file at `out_path` (atomically: a temporary file beside it, then renamed).

    `dtype`: f32, f16 or q8_0. `out_path` must be new or an earlier lmforge GGUF export."""
    from gguf import GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a GGUF export type; choose one of {', '.join(GGUF_DTYPES)}")
    start = time.perf_counter()
    checkpoint_dir, out_path = require_checkpoint(checkpoint_dir), Path(out_path)
    if not (checkpoint_dir / TOKENIZER).is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no {TOKENIZER}; a GGUF export needs the model's tokenizer")
    if has_prefix(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} is prefix-tuned: llama.cpp has no learned key/value prefix, and exporting "
                         "the weights alone would silently drop the tuning. Export a full or LoRA fine-tune (LoRA is "
                         "merged into the weights) instead")  # fmt: skip
    _check_output(out_path)
    model, args = load_model(checkpoint_dir)
    arch = gguf_architecture(args)
    state = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
    with atomic_path(out_path) as tmp:
        writer = GGUFWriter(tmp, arch)
        writer.add_name(checkpoint_dir.name)
        writer.add_file_type(file_type[dtype])
        writer.add_uint32(MARKER_KEY, 1)
        _add_hparams(writer, args, arch, args.vocab_size)
        _add_tokenizer(writer, checkpoint_dir, args.vocab_size)
        for name, array in gguf_tensors(state, args, arch).items():
            qtype = tensor_type(name, array, dtype)
            writer.add_tensor(name, quantize(np.ascontiguousarray(array), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("exported %s to %s (GGUF %s, %s, %.1f MB) in %.1fs", checkpoint_dir, out_path, arch, dtype,
             out_path.stat().st_size / 1e6, time.perf_counter() - start)  # fmt: skip
    return out_path
