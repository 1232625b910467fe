"""LoRA adapters applied from outside: the model file stays plain.

`apply_lora(model, cfg)` swaps chosen `nn.Linear` modules for `LoRALinear` wrappers in place. The wrapped linear
is kept as `.base` (frozen), so the live state dict shows `...q_proj.base.weight`; `base_state_dict(model)` maps
those keys back to the original names (`...q_proj.weight`) and leaves the adapters out, so it loads strictly into
a plain model. Several named adapters can share one base (`set_active`); `merge_lora` folds an adapter into the
base weights in place and `unmerge_lora` takes it back out.

Adapters are saved as `adapter.safetensors` (only the adapter's A/B tensors, keys relative to the model) plus
`adapter.json` (config, wrapped modules, base shape fingerprint), each written atomically (lmforge/io.py).

Caveat: merging into a linear whose weight is shared (a tied `lm_head`) also changes the tied tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from lmforge.io import atomic_open, atomic_write_text

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT_VERSION = 1


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=("q_proj", "v_proj"))

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one module suffix")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """`base(x) + sum_active dropout(x) @ A.T @ B.T * alpha / r`, with the base linear frozen."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self.merged: set[str] = set()
        self.active: list[str] = []

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, cfg: LoRAConfig) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this module; adapters: {self.adapters}")
        w = self.base.weight
        a = torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as in the paper's reference code and peft
        b = torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        self.configs[name] = cfg
        self.active.append(name)

    def _check(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this module; adapters: {self.adapters}")

    def set_active(self, names: Iterable[str]) -> None:
        names = list(names)
        for n in names:
            self._check(n)
        self.active = names

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ A * scaling [out, in], computed in fp32."""
        self._check(name)
        a, b = self.lora_A[name].float(), self.lora_B[name].float()
        return (b @ a) * self.scaling[name]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        self._check(name)
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is already merged")
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged.add(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        self._check(name)
        if name not in self.merged:
            raise RuntimeError(f"adapter {name!r} is not merged")
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
        self.merged.discard(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name in self.active:
            if name in self.merged:  # already inside base.weight
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            # Scale the rank-r intermediate, not the [.., out_features] result: one full-size temporary less.
            h = (self.lora_dropout[name](x.to(a.dtype)) @ a.T) * self.scaling[name]
            out = out + (h @ b.T).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active}, merged={sorted(self.merged)}"


# --- module discovery -------------------------------------------------------------------------------------------


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _candidate_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers by name, counting an existing LoRALinear as its own name (not `<name>.base`)."""
    wrapped = lora_modules(model)
    inner = {f"{n}.base" for n in wrapped}
    out: dict[str, nn.Module] = {}
    for n, m in model.named_modules():
        if n in inner:
            continue
        if isinstance(m, LoRALinear) or isinstance(m, nn.Linear):
            out[n] = m
    return out


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- public API -------------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, cfg: LoRAConfig, name: str = "default") -> list[str]:
    """Wrap every linear whose name ends with a target suffix and add adapter `name`; return the wrapped names.

    Every non-adapter parameter is frozen; all adapters' parameters are left trainable."""
    if not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    linears = _candidate_linears(model)
    missing = [t for t in cfg.targets if not any(_matches(n, t) for n in linears)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"LoRA targets {missing} match no nn.Linear in the model; available suffixes: {suffixes}")
    chosen = [n for n in linears if any(_matches(n, t) for t in cfg.targets)]
    for n in chosen:  # check before changing anything
        m = linears[n]
        if isinstance(m, LoRALinear) and name in m.lora_A:
            raise ValueError(f"adapter {name!r} already applied to {n}")
    for n in chosen:
        m = linears[n]
        if not isinstance(m, LoRALinear):
            m = LoRALinear(m)  # type: ignore[arg-type]
            _set_submodule(model, n, m)
        m.add_adapter(name, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        for p in list(m.lora_A.values()) + list(m.lora_B.values()):
            p.requires_grad_(True)
    return chosen


def set_active(model: nn.Module, names: Iterable[str]) -> None:
    """Make exactly `names` active on every wrapped module (those a module lacks are skipped there)."""
    names = list(names)
    wrapped = lora_modules(model)
    known = {a for m in wrapped.values() for a in m.adapters}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; known: {sorted(known)}")
    for m in wrapped.values():
        m.set_active([n for n in names if n in m.lora_A])


def _modules_with(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    mods = {n: m for n, m in lora_modules(model).items() if name in m.lora_A}
    if not mods:
        known = sorted({a for m in lora_modules(model).values() for a in m.adapters})
        raise KeyError(f"no adapter {name!r} in the model; adapters: {known}")
    return mods


def merge_lora(model: nn.Module, name: str = "default") -> None:
    for m in _modules_with(model, name).values():
        m.merge(name)


def unmerge_lora(model: nn.Module, name: str = "default") -> None:
    for m in _modules_with(model, name).values():
        m.unmerge(name)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original key names, adapters left out.

    Merged adapters stay inside the weights (that is the point of merging); unmerged ones are simply absent."""
    wrapped = lora_modules(model)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner = next((w for w in wrapped if key.startswith(w + ".")), None)
        if owner is None:
            out[key] = t
            continue
        local = key[len(owner) + 1 :]
        if local.startswith(("lora_A.", "lora_B.")):
            continue
        if not local.startswith("base."):
            raise RuntimeError(f"unexpected key {key!r} in a LoRALinear")
        out[f"{owner}.{local[len('base.'):]}"] = t
    return out


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Only adapter `name`'s tensors, e.g. `model.layers.0.self_attn.q_proj.lora_A.default`."""
    out: dict[str, torch.Tensor] = {}
    for n, m in _modules_with(model, name).items():
        out[f"{n}.lora_A.{name}"] = m.lora_A[name].detach().clone()
        out[f"{n}.lora_B.{name}"] = m.lora_B[name].detach().clone()
    return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # deduplicated, so tied weights count once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Shapes of the base model's tensors, under their original names."""
    return {k: list(v.shape) for k, v in base_state_dict(model).items()}


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike[str]) -> Path:
    """Write `adapter.safetensors` and `adapter.json` (written last) into `directory`; return the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    mods = _modules_with(model, name)
    merged = [n for n, m in mods.items() if name in m.merged]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged into {merged[:3]}...; unmerge_lora before saving")
    cfg = next(iter(mods.values())).configs[name]
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": asdict(cfg),
        "modules": list(mods),
        "base_shapes": base_fingerprint(model),
    }
    with atomic_open(d / ADAPTER_WEIGHTS, "wb") as f:
        f.write(save(tensors, metadata={"name": name}))
    atomic_write_text(d / ADAPTER_CONFIG, json.dumps(meta, indent=2))
    return d


def _shape_mismatches(saved: dict[str, list[int]], current: dict[str, list[int]]) -> list[str]:
    problems = [f"{k}: missing in model (saved {v})" for k, v in saved.items() if k not in current]
    problems += [f"{k}: not in saved base" for k in current if k not in saved]
    problems += [f"{k}: saved {v}, model {current[k]}" for k, v in saved.items() if k in current and current[k] != v]
    return problems


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None) -> str:
    """Load an adapter saved by `save_adapter`, applying LoRA with its saved config if needed; return its name."""
    d = Path(directory)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"{d} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    meta = json.loads(cfg_path.read_text())
    saved_name: str = meta["name"]
    name = name or saved_name
    problems = _shape_mismatches(meta["base_shapes"], base_fingerprint(model))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"adapter at {d} was saved for a different base model: {shown}")
    cfg = LoRAConfig(**meta["config"])
    present = {n for n, m in lora_modules(model).items() if name in m.lora_A}
    if not present:
        wrapped = apply_lora(model, cfg, name)
        if sorted(wrapped) != sorted(meta["modules"]):
            raise ValueError(f"targets {cfg.targets} wrap {wrapped} here but {meta['modules']} when saved")
    elif sorted(present) != sorted(meta["modules"]):
        raise ValueError(f"adapter {name!r} already on {sorted(present)}, saved for {meta['modules']}")
    saved = load_file(str(w_path))
    tensors: dict[str, torch.Tensor] = {}
    for key, t in saved.items():
        mod, kind, adapter = key.rsplit(".", 2)
        if adapter != saved_name or kind not in ("lora_A", "lora_B"):
            raise ValueError(f"unexpected key {key!r} in {w_path}")
        tensors[f"{mod}.{kind}.{name}"] = t
    expected = adapter_state_dict(model, name)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [f"{k}: file {tuple(t.shape)}, model {tuple(expected[k].shape)}" for k, t in tensors.items()
           if t.shape != expected[k].shape]
    if bad:
        raise ValueError(f"adapter tensor shapes do not match the model: {bad[:5]}")
    mods = lora_modules(model)
    with torch.no_grad():
        for key, t in tensors.items():
            mod, kind, _ = key.rsplit(".", 2)
            getattr(mods[mod], kind)[name].copy_(t)
    return name
