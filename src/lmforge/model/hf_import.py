"""Load a local Hugging Face causal-LM directory (config.json + safetensors) into lmforge's one backbone, exactly.

    model_type   lmforge model                                         weights
    llama        arch=llama, swiglu; attention_bias -> attn_bias=qkvo; same names (LlamaForCausalLM's are ours)
                 rope_scaling linear / llama3 kept
    mistral      as llama; with a sliding window W, max_seq_len is       same names
                 clamped to W (see below)
    qwen2        as llama with attn_bias=qkv (q/k/v biases)            same names
    qwen3        as llama with qk_norm (q_norm / k_norm), explicit       same names
                 head_dim; attention_bias -> attn_bias=qkvo
    gpt2         arch=gpt2 (LayerNorm, learned positions, tanh GELU,   c_attn split into q/k/v, Conv1D weights
                 tied embeddings)                                      transposed, "transformer." prefix optional

transformers is not imported: config.json is read as JSON and the weights with safetensors. Both transformers 4.x
configs (`rope_theta` + `rope_scaling`) and 5.x ones (`rope_parameters`) are read. A field that would make the
model compute something lmforge does not (another activation, yarn rope, sliding-window layers, an MLP bias, ...)
is refused with a ValueError naming the field, its value and what is supported. Fields left unread are no-ops at
inference: dropouts (lmforge trains without dropout), token ids and the dtype note (the tensors' own dtype counts),
gpt2's summary_* (for GPT2DoubleHeadsModel only), qwen2/qwen3's sliding_window and max_window_layers when
use_sliding_window is false, and pretraining_tp (a sliced but equal matmul).

Sliding window (mistral): query i sees keys i - W + 1 .. i. For sequences of at most W tokens that is every
earlier key, so full causal attention computes exactly the same; the context is clamped to W (logged) rather
than computing a different model past it.

Weights are memory-mapped: the model is built on the meta device and the safetensors tensors are assigned as its
parameters, so the stored bytes are not copied (gpt2's Conv1D matrices become transposed views; only its fused
q/k/v matrices, a quarter of each block, are split into copies). The stored dtype is kept unless `dtype` asks
for another; tensors stored in a dtype other than the token embeddings' are cast to it, so the model has one
parameter dtype.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lmforge.hub import resolve_model_dir
from lmforge.model.transformer import ModelArgs, Transformer

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["hf_model_args", "load_hf_model", "resolve_model_dir"]

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# Buffers some checkpoints carry that are derived from the config, not weights.
# (gpt2's causal-mask buffers are h.N.attn.bias / masked_bias; its c_attn.bias is a weight.)
NON_WEIGHTS = re.compile(r"(rotary_emb\.inv_freq|(^|\.)attn\.bias|(^|\.)attn\.masked_bias)$")


class _Fields:
    """config.json's fields for one model family, with errors naming the file, the field and its value."""

    def __init__(self, config: dict[str, Any], source: Path, family: str) -> None:
        self.config, self.source, self.family = config, source, family

    def get(self, name: str, default: Any) -> Any:
        value = self.config.get(name)
        return default if value is None else value

    def need(self, name: str) -> Any:
        if self.config.get(name) is None:
            raise ValueError(f"{self.source}: {name} is missing; a {self.family} config.json must give it")
        return self.config[name]

    def refuse(self, name: str, value: Any, supported: str) -> ValueError:
        return ValueError(f"{self.source}: {name}={value!r} is not supported for {self.family} ({supported})")

    def only(self, name: str, default: Any, allowed: tuple[Any, ...]) -> Any:
        value = self.get(name, default)
        if value not in allowed:
            raise self.refuse(name, value, "only " + " or ".join(map(repr, allowed)))
        return value


def hf_model_args(config: dict[str, Any], source: Path) -> ModelArgs:
    """The ModelArgs that computes what the Hugging Face model of `config` (read from `source`) computes."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{source}: model_type={family!r} is not supported (only {', '.join(FAMILIES)})")
    f = _Fields(config, source, family)
    archs = f.get("architectures", [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise f.refuse("architectures", archs, "only a causal language model: *ForCausalLM or GPT2LMHeadModel")
    return _gpt2_args(f) if family == "gpt2" else _llama_family_args(f)


def _llama_family_args(f: _Fields) -> ModelArgs:
    d_model, n_heads = f.need("hidden_size"), f.need("num_attention_heads")
    f.only("hidden_act", "silu", ("silu",))
    layer_types = f.get("layer_types", [])
    if any(t != "full_attention" for t in layer_types):
        raise f.refuse("layer_types", sorted(set(layer_types)), "only 'full_attention' layers")
    if f.family in ("qwen2", "qwen3"):
        f.only("use_sliding_window", False, (False,))
    if f.family == "llama":
        f.only("mlp_bias", False, (False,))
    # Qwen2 always has q/k/v biases; Llama's and Qwen3's attention_bias puts a bias on all four projections.
    if f.family == "qwen2":
        attn_bias = "qkv"
    elif f.family in ("llama", "qwen3"):
        attn_bias = "qkvo" if f.only("attention_bias", False, (False, True)) else "none"
    else:
        attn_bias = "none"
    max_seq_len = f.need("max_position_embeddings")
    window = f.get("sliding_window", None) if f.family == "mistral" else None
    if window is not None and window < max_seq_len:
        log.info("%s: sliding_window=%d < max_position_embeddings=%d: the context is clamped to %d tokens, where "
                 "full causal attention equals sliding-window attention exactly", f.source, window, max_seq_len,
                 window)  # fmt: skip
        max_seq_len = window
    theta, scaling = _rope(f)
    return ModelArgs(
        vocab_size=f.need("vocab_size"),
        n_layers=f.need("num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=f.get("num_key_value_heads", n_heads),
        head_dim=f.get("head_dim", d_model // n_heads),
        mlp_hidden=f.need("intermediate_size"),
        max_seq_len=max_seq_len,
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        rope_theta=float(theta),
        norm_eps=f.get("rms_norm_eps", 1e-6),
        init_std=f.get("initializer_range", 0.02),
        qk_norm=f.family == "qwen3",
        attn_bias=attn_bias,
        rope_scaling=scaling,
    )


def _rope(f: _Fields) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or 4.x's rope_theta + rope_scaling."""
    if f.config.get("rope_parameters") is not None:
        field, params = "rope_parameters", dict(f.config["rope_parameters"])
        theta = params.get("rope_theta", f.get("rope_theta", 10_000.0))
    else:
        field, params = "rope_scaling", dict(f.get("rope_scaling", {}))
        theta = f.get("rope_theta", 10_000.0)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise f.refuse(field, params, "only one set of rope parameters shared by every layer")
    partial = params.get("partial_rotary_factor", f.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise f.refuse("partial_rotary_factor", partial, "only 1.0: rotary over the whole head")
    kind = params.get("rope_type", params.get("type", "default"))

    def number(key: str, default: Any = None) -> float:
        value = params.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise f.refuse(f"{field}.{key}", value, f"a number is needed for rope_type {kind!r}")
        return float(value)

    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": number("factor")}
    if kind == "llama3":
        old_len = int(number("original_max_position_embeddings", f.get("max_position_embeddings", None)))
        return theta, {"rope_type": "llama3", "factor": number("factor"), "low_freq_factor": number("low_freq_factor"),
                       "high_freq_factor": number("high_freq_factor"), "original_max_position_embeddings": old_len}  # fmt: skip
    raise f.refuse(f"{field}.rope_type", kind, "only 'default', 'linear' or 'llama3'")


def _gpt2_args(f: _Fields) -> ModelArgs:
    f.only("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"))
    f.only("scale_attn_weights", True, (True,))
    f.only("scale_attn_by_inverse_layer_idx", False, (False,))
    f.only("reorder_and_upcast_attn", False, (False,))
    f.only("add_cross_attention", False, (False,))
    f.only("tie_word_embeddings", True, (True,))
    d_model, n_heads = f.need("n_embd"), f.need("n_head")
    return ModelArgs(
        vocab_size=f.need("vocab_size"),
        n_layers=f.need("n_layer"),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        mlp_hidden=f.get("n_inner", 4 * d_model),
        max_seq_len=f.need("n_positions"),
        tie_embeddings=True,
        norm_eps=f.get("layer_norm_epsilon", 1e-5),
        init_std=f.get("initializer_range", 0.02),
        arch="gpt2",
        mlp="gelu",
    )


def weight_files(dir: Path) -> list[Path]:
    """The safetensors files of a model directory: model.safetensors, or the shards its index names."""
    if (dir / SINGLE).is_file():
        return [dir / SINGLE]
    if (dir / INDEX).is_file():
        weight_map = json.loads((dir / INDEX).read_text(encoding="utf-8")).get("weight_map") or {}
        shards = [dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if not shards or missing:
            raise FileNotFoundError(f"{dir / INDEX} names shards that are not there: {missing or 'none at all'}")
        return shards
    pickles = sorted(p.name for p in dir.glob("*.bin")) + sorted(p.name for p in dir.glob("*.pt*"))
    if pickles:
        raise ValueError(
            f"{dir} holds PyTorch pickle weights ({', '.join(pickles)}), which lmforge never unpickles; convert them "
            "to safetensors first, e.g. python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{dir}').save_pretrained('{dir}-safetensors')\" and pass {dir}-safetensors"
        )
    raise FileNotFoundError(f"{dir} has no {SINGLE} or {INDEX}: no safetensors weights to load")


def load_hf_model(
    dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, ModelArgs]:
    """The model of a Hugging Face directory as an lmforge Transformer, its weights memory-mapped (on CPU) and
    loaded strictly: a tensor the config does not call for, or one it calls for and the files lack, is an error."""
    dir = Path(dir)
    config_path = dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{dir} is not a Hugging Face model directory: it has no config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    args = hf_model_args(config, config_path)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in weight_files(dir):
        found = load_file(path, device=str(device))
        tensors.update(found)
        origin.update(dict.fromkeys(found, path))

    def read_apart(name: str) -> torch.Tensor:
        # A tensor in a mapping of its own: once the caller has copied what it needs and dropped it, the mapping
        # and its resident pages go, instead of staying with the file's shared mapping until the load ends.
        with safe_open(str(origin[name]), framework="pt", device=str(device)) as f:
            return f.get_tensor(name)

    state = _gpt2_state(tensors, args, read_apart) if args.arch == "gpt2" else _llama_state(tensors, args)
    with torch.device("meta"):
        model = Transformer(args)
    _check_names_and_shapes(dir, state, model)
    target = dtype or state["model.embed_tokens.weight"].dtype
    state = {name: t if t.dtype == target else t.to(target) for name, t in state.items()}
    embed = state["model.embed_tokens.weight"]
    model.load_state_dict(state | ({"lm_head.weight": embed} if args.tie_embeddings else {}), assign=True)
    if args.tie_embeddings:  # assign replaced both parameters; tie them again so training updates one table
        model.lm_head.weight = model.model.embed_tokens.weight
    if model.rotary:
        model.build_rope(device=device)
    log.info("loaded %s: %s (%s parameters, %s)", dir, config["model_type"], f"{model.num_params():,}",
             str(target).removeprefix("torch."))  # fmt: skip
    return model, args


def _llama_state(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Llama-family names already are lmforge's; derived buffers and a tied lm_head's copy are left out."""
    tied_copy = "lm_head.weight" if args.tie_embeddings else None
    return {name: t for name, t in tensors.items() if name != tied_copy and not NON_WEIGHTS.search(name)}


def _gpt2_state(
    tensors: dict[str, torch.Tensor], args: ModelArgs, read_apart: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors (with or without the "transformer." prefix) under lmforge's gpt2-arch names.

    Conv1D stores [in, out]: matrices become transposed views of the mapped bytes (no copy: F.linear then reads
    them in their stored layout; a checkpoint writes them contiguous), and the fused c_attn is split into q/k/v
    copies (views would share one storage), each read by `read_apart` so that the pages read for the copy leave
    memory with it. Names not consumed stay in the result, to be reported."""
    stored = {name.removeprefix("transformer."): name for name in tensors}
    src = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    src = {name: t for name, t in src.items() if name != "lm_head.weight" and not NON_WEIGHTS.search(name)}
    out: dict[str, torch.Tensor] = {}

    def move(theirs: str, ours: str, transpose: bool = False) -> None:
        if theirs in src:
            t = src.pop(theirs)
            out[ours] = t.t() if transpose else t

    move("wte.weight", "model.embed_tokens.weight")
    move("wpe.weight", "model.embed_positions.weight")
    move("ln_f.weight", "model.norm.weight")
    move("ln_f.bias", "model.norm.bias")
    width = args.n_heads * args.head_dim
    for i in range(args.n_layers):
        h, ours = f"h.{i}.", f"model.layers.{i}."
        for part in ("weight", "bias"):
            move(f"{h}ln_1.{part}", f"{ours}input_layernorm.{part}")
            move(f"{h}ln_2.{part}", f"{ours}post_attention_layernorm.{part}")
            for theirs, mine in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                                 ("mlp.c_proj", "mlp.down_proj")):  # fmt: skip
                move(f"{h}{theirs}.{part}", f"{ours}{mine}.{part}", transpose=part == "weight")
            theirs = f"{h}attn.c_attn.{part}"
            if src.pop(theirs, None) is not None:
                fused = read_apart(stored[theirs])
                fused = fused.t() if part == "weight" else fused
                for name, t in zip("qkv", fused.split(width, dim=0)):  # copies: a view would share storage
                    out[f"{ours}self_attn.{name}_proj.{part}"] = t.clone(memory_format=torch.contiguous_format)
    return out | src


def _check_names_and_shapes(dir: Path, state: dict[str, torch.Tensor], model: Transformer) -> None:
    """Raise ValueError naming the tensors the files lack, those the config does not call for, and any of the
    wrong shape (names are lmforge's; for llama-family models they are also the files')."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    if model.args.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{n} {list(state[n].shape)} (config.json implies {list(expected[n])})"
             for n in sorted(set(state) & set(expected)) if state[n].shape != expected[n]]  # fmt: skip
    problems = [f"{label} {items[:8]}{f' and {len(items) - 8} more' if len(items) > 8 else ''}"
                for label, items in (("missing tensors", missing), ("tensors config.json does not call for",
                                     unexpected), ("tensors of the wrong shape", wrong)) if items]  # fmt: skip
    if problems:
        raise ValueError(f"{dir}: the safetensors weights do not match config.json: {'; '.join(problems)}")
