"""Rotary position embeddings: frequencies (plain, or rescaled for a longer context), cos/sin tables, rotation.

Scaling (`ModelArgs.rope_scaling`, None for plain rope) follows the two schemes Hugging Face Llama checkpoints
declare, with the same frequencies as transformers computes for them:

- {"rope_type": "linear", "factor": f}: every frequency divided by f (positions stretched f times).
- {"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
  "original_max_position_embeddings": n}: Llama 3.1's scheme. Wavelengths shorter than n / hi keep their
  frequency, those longer than n / lo are divided by f, and the band between blends the two smoothly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("linear", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Raise ValueError naming the key when `scaling` is not None and not one of the schemes above."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type={kind!r} is not supported; choose one of {ROPE_TYPES} or None")
    needed = ("factor",) if kind == "linear" else LLAMA3_KEYS
    missing = [k for k in needed if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ValueError(f"rope_scaling {kind} needs numeric {missing}, got {scaling}")
    extra = sorted(set(scaling) - {"rope_type", *needed})
    if extra:
        raise ValueError(f"rope_scaling {kind} takes only {['rope_type', *needed]}, got also {extra}")
    if scaling["factor"] <= 0:
        raise ValueError(f"rope_scaling factor must be positive, got {scaling['factor']}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling llama3 needs high_freq_factor > low_freq_factor, got {scaling}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths span more than the original context: slow them down by `factor`.
    slowed = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    # In between, blend linearly in old_len / wavelen from slowed (at lo) to untouched (at hi).
    blend = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - blend) * slowed / factor + blend * slowed
    in_band = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(in_band, blended, slowed)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """The head_dim / 2 rotation frequencies (fp32), rescaled by `scaling` when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_inv_freq(inv_freq, scaling)


def rope_tables(
    head_dim: int,
    length: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [length, head_dim] in fp32 for positions 0..length-1, laid out for rotate-half."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device)  # type: ignore[arg-type]
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D], cast to x's dtype (as transformers does) before rotating."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
