"""Prefix tuning (Li & Liang 2021) applied from outside: the model file stays plain.

`apply_prefix(model, cfg)` registers a `PrefixTuning` module at `model.prefix_tuning`, freezes every other
parameter and points each layer's `self_attn.prefix_kv` hook at it, so attention prepends P learned keys/values
[n_kv_heads, P, head_dim] per layer to its own. The prefix is either free tensors or, with `reparam=True`, the
output of an MLP over P learned embeddings (the paper's re-parameterisation, which steadies training);
`materialize()` folds the MLP into the free tensor once training is done. `remove_prefix` gives the plain model back.

    prefix.safetensors  {"prefix": [n_layers, 2 (keys, values), n_kv_heads, P, head_dim]}, always materialised
    prefix.json         format version, the tensor's dimensions and the config it was trained with

The directory is written whole into a staging sibling and renamed into place (`staged_dir`), so it should hold
nothing else.

Positions: real tokens keep positions 0..T-1 and the prefix keys are not rotated, so with rotary or learned
positions what a query reads from the prefix depends on its absolute position. A packed document therefore sees
the prefix as it would at its own row offset, not as it would alone at position 0 (only the first document matches
running it alone). The layout is lmforge's own, not interchangeable with peft's prefix format.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.io import staged_dir
from lmforge.model.kv_cache import KVCache
from lmforge.model.lora import trainable_parameters
from lmforge.model.transformer import ModelArgs, Transformer

log = logging.getLogger(__name__)

PREFIX_WEIGHTS = "prefix.safetensors"
PREFIX_CONFIG = "prefix.json"
PREFIX_KEY = "prefix"
PREFIX_ATTR = "prefix_tuning"
FORMAT_VERSION = 1
INITS = ("random", "tokens")


@dataclass
class PrefixConfig:
    """length: P virtual tokens per layer. reparam: learn P embeddings [P, d_model] mapped through
    Linear(d_model, mlp_hidden) -> tanh -> Linear(mlp_hidden, n_layers * 2 * n_kv_heads * head_dim).
    init: "random" (normal, std init_std; with reparam the MLP's last layer gets that std and a zero bias) or
    "tokens" (the keys, after rotary, and values the model itself computes for `init_tokens`, cycled or cut to P)."""

    length: int = 16
    reparam: bool = False
    mlp_hidden: int = 256
    init: Literal["random", "tokens"] = "random"
    init_tokens: tuple[int, ...] = ()
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.init_tokens = tuple(int(t) for t in self.init_tokens)
        if self.length < 1:
            raise ValueError(f"prefix length must be >= 1, got {self.length}")
        if self.mlp_hidden < 1:
            raise ValueError(f"prefix mlp_hidden must be >= 1, got {self.mlp_hidden}")
        if self.init not in INITS:
            raise ValueError(f"prefix init={self.init!r}; choose one of {INITS}")
        if self.init_std <= 0:
            raise ValueError(f"prefix init_std must be positive, got {self.init_std}")
        if self.init == "tokens":
            if not self.init_tokens:
                raise ValueError("prefix init='tokens' needs init_tokens, the token ids whose keys/values to copy")
            if self.reparam:
                raise ValueError("prefix init='tokens' sets the keys/values directly; it needs reparam=False")
            if min(self.init_tokens) < 0:
                raise ValueError(f"prefix init_tokens must be token ids >= 0, got {list(self.init_tokens)}")
        elif self.init_tokens:
            raise ValueError("prefix init_tokens are used only with init='tokens'")


class PrefixTuning(nn.Module):
    """The learned keys/values of every layer, as free tensors or as the output of the re-parameterising MLP."""

    def __init__(
        self,
        args: ModelArgs,
        cfg: PrefixConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_layers, self.n_kv_heads, self.head_dim, self.length = (
            args.n_layers, args.n_kv_heads, args.head_dim, cfg.length)  # fmt: skip
        # Base parameters' requires_grad before apply_prefix froze them, by name; remove_prefix restores them.
        self.base_requires_grad: dict[str, bool] = {}
        kw = {"device": device, "dtype": dtype}
        if cfg.reparam:
            self.embedding = nn.Parameter(torch.empty(cfg.length, args.d_model, **kw))  # type: ignore[arg-type]
            self.mlp_in = nn.Linear(args.d_model, cfg.mlp_hidden, **kw)  # type: ignore[arg-type]
            self.mlp_out = nn.Linear(cfg.mlp_hidden, args.n_layers * self._layer_width, **kw)  # type: ignore[arg-type]
        else:
            self.prefix = nn.Parameter(torch.empty(self.shape, **kw))  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.n_layers, 2, self.n_kv_heads, self.length, self.head_dim)

    @property
    def _layer_width(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    @property
    def reparam(self) -> bool:
        return hasattr(self, "mlp_out")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Small normal keys/values (reparam: N(0, 1) embeddings, default first layer, small last layer)."""
        std = self.cfg.init_std
        if self.reparam:
            nn.init.normal_(self.embedding)
            self.mlp_in.reset_parameters()
            nn.init.normal_(self.mlp_out.weight, std=std)
            nn.init.zeros_(self.mlp_out.bias)
        else:
            nn.init.normal_(self.prefix, std=std)

    def layer_kv(self, layer: int) -> torch.Tensor:
        """[2, n_kv_heads, P, head_dim] for one layer (with reparam, only that layer's rows of the last linear)."""
        if not self.reparam:
            return self.prefix[layer]
        rows = slice(layer * self._layer_width, (layer + 1) * self._layer_width)
        h = torch.tanh(self.mlp_in(self.embedding))
        out = F.linear(h, self.mlp_out.weight[rows], self.mlp_out.bias[rows])  # [P, 2 * H * D]
        return out.view(self.length, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)

    def kv(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention hook: (k, v), each [batch_size, n_kv_heads, P, head_dim], expanded views (no copies)."""
        t = self.layer_kv(layer)
        size = (batch_size, self.n_kv_heads, self.length, self.head_dim)
        return t[0].expand(size), t[1].expand(size)

    def kv_tensor(self) -> torch.Tensor:
        """Every layer's keys/values [n_layers, 2, n_kv_heads, P, head_dim], computed exactly as the hook does."""
        if not self.reparam:
            return self.prefix
        return torch.stack([self.layer_kv(i) for i in range(self.n_layers)])

    @torch.no_grad()
    def materialize(self) -> None:
        """Replace the embeddings and MLP by the free tensor they produce (same outputs, bit for bit). Call it after
        training: an optimizer still holding the MLP's parameters would no longer reach the prefix."""
        if not self.reparam:
            return
        t = self.kv_tensor().clone()
        trainable = self.embedding.requires_grad
        del self.embedding, self.mlp_in, self.mlp_out
        self.prefix = nn.Parameter(t, requires_grad=trainable)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, reparam={self.reparam}"


# --- attaching and removing -------------------------------------------------------------------------------------


def prefix_module(model: nn.Module) -> PrefixTuning:
    module = getattr(model, PREFIX_ATTR, None)
    if not isinstance(module, PrefixTuning):
        raise ValueError(f"the model has no prefix attached (no `{PREFIX_ATTR}`); use apply_prefix or load_prefix")
    return module


def _attach(model: Transformer, module: PrefixTuning) -> None:
    """Register `module`, freeze the base and set every layer's hook; refuses a model that already has a prefix."""
    if hasattr(model, PREFIX_ATTR) or any(layer.self_attn.prefix_kv is not None for layer in model.model.layers):
        raise ValueError("the model already has a prefix attached; remove_prefix(model) first")
    module.base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    # A registered submodule moves with model.to(), is found by model.parameters() and is saved in the training
    # loop's checkpoints, so resuming needs nothing special.
    model.add_module(PREFIX_ATTR, module)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.prefix_kv = partial(module.kv, i)


@torch.no_grad()
def _token_kv(model: Transformer, token_ids: tuple[int, ...], length: int) -> torch.Tensor:
    """[n_layers, 2, n_kv_heads, length, head_dim]: the keys (after rotary) and values the model computes for
    `token_ids` cycled to `length` tokens, read back from a KV cache after one forward pass."""
    a = model.args
    bad = [t for t in token_ids if t >= a.vocab_size]
    if bad:
        raise ValueError(f"prefix init_tokens {bad[:5]} are outside the model's vocabulary of {a.vocab_size}")
    if length > a.max_seq_len:
        raise ValueError(f"prefix length {length} exceeds max_seq_len={a.max_seq_len}, too long for init='tokens'")
    device = next(model.parameters()).device
    ids = torch.tensor([[token_ids[i % len(token_ids)] for i in range(length)]], device=device)
    cache = KVCache.for_model(model, 1, length)
    model(ids, cache=cache)
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in zip(cache.k, cache.v)])


def apply_prefix(model: Transformer, cfg: PrefixConfig) -> PrefixTuning:
    """Attach a new prefix initialised per `cfg`, freeze every base parameter; return the (trainable) module."""
    p = next(model.parameters())
    module = PrefixTuning(model.args, cfg, device=p.device, dtype=p.dtype)
    module.reset_parameters()
    if cfg.init == "tokens":  # computed before the hooks exist, so the model runs as its plain self
        module.prefix.data.copy_(_token_kv(model, cfg.init_tokens, cfg.length))
    _attach(model, module)
    trainable, total = trainable_parameters(model)
    log.info("prefix tuning: %d trainable of %d parameters (%s)", trainable, total, module.extra_repr())
    return module


def remove_prefix(model: Transformer) -> PrefixTuning:
    """Clear the hooks, unregister the prefix and give each base parameter back the requires_grad it had before
    the prefix was attached, so apply + remove leaves the model exactly as it was. Returns the removed module."""
    module = prefix_module(model)
    for layer in model.model.layers:
        layer.self_attn.prefix_kv = None
    delattr(model, PREFIX_ATTR)
    for n, p in model.named_parameters():
        p.requires_grad_(module.base_requires_grad.get(n, p.requires_grad))
    return module


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the prefix's trainable tensors, keyed as in the model (e.g. `prefix_tuning.prefix`)."""
    return {f"{PREFIX_ATTR}.{k}": v.detach().clone() for k, v in prefix_module(model).state_dict().items()}


# --- saving and loading -----------------------------------------------------------------------------------------


def save_prefix(model_or_module: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write `prefix.safetensors` (the materialised keys/values) and `prefix.json` as one staged directory."""
    module = model_or_module if isinstance(model_or_module, PrefixTuning) else prefix_module(model_or_module)
    with torch.no_grad():
        tensor = module.kv_tensor().detach().contiguous().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "length": module.length,
        "n_layers": module.n_layers,
        "n_kv_heads": module.n_kv_heads,
        "head_dim": module.head_dim,
        "reparam": module.cfg.reparam,
        "config": asdict(module.cfg),
    }
    d = Path(directory)
    with staged_dir(d) as tmp:
        save_file({PREFIX_KEY: tensor}, str(tmp / PREFIX_WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        (tmp / PREFIX_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return d


def _read_prefix(d: Path, args: ModelArgs) -> torch.Tensor:
    """The saved tensor, checked against its prefix.json and against the model's dimensions."""
    cfg_path, w_path = d / PREFIX_CONFIG, d / PREFIX_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{d} is not a prefix directory (needs {PREFIX_CONFIG} and {PREFIX_WEIGHTS})")
    meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {meta.get('format_version')!r}; expected {FORMAT_VERSION}")
    tensors = load_file(str(w_path))
    if set(tensors) != {PREFIX_KEY}:
        raise ValueError(f"{w_path} should hold exactly one tensor {PREFIX_KEY!r}, found {sorted(tensors)}")
    t = tensors[PREFIX_KEY]
    names = ("n_layers", "kv", "n_kv_heads", "length", "head_dim")
    if t.dim() != 5 or t.shape[1] != 2:
        raise ValueError(f"{w_path}: tensor shape {tuple(t.shape)} is not [{', '.join(names)}] with kv = 2")
    saved = dict(zip(names, t.shape))
    declared = [f"{k}: json {meta.get(k)}, tensor {saved[k]}" for k in names if k != "kv" and meta.get(k) != saved[k]]
    if declared:
        raise ValueError(f"{w_path} does not match {cfg_path}: {'; '.join(declared)}")
    model_dims = {"n_layers": args.n_layers, "n_kv_heads": args.n_kv_heads, "head_dim": args.head_dim}
    wrong = [f"{k}: file {saved[k]}, model {v}" for k, v in model_dims.items() if saved[k] != v]
    if wrong:
        raise ValueError(f"prefix {w_path} was saved for a different model: {'; '.join(wrong)}")
    return t


def load_prefix(model: Transformer, directory: str | os.PathLike[str], trainable: bool = False) -> PrefixTuning:
    """Attach the prefix saved in `directory` (as free tensors, whatever it was trained with); the base is frozen
    as by apply_prefix, and the prefix trains only with `trainable`. Returns the module."""
    t = _read_prefix(Path(directory), model.args)
    p = next(model.parameters())
    module = PrefixTuning(model.args, PrefixConfig(length=t.shape[3]), device=p.device, dtype=p.dtype)
    with torch.no_grad():
        module.prefix.copy_(t)
    module.requires_grad_(trainable)
    _attach(model, module)
    return module
