"""The batching engine's decode step as one compiled graph of fixed shapes (`BatchEngine(compile=True)`).

For a small model the eager decode step is all overhead: a hundred small operators, each a Python call and a
dispatch, around matrix products that take microseconds. `torch.compile` fuses the step into a few kernels, but only
pays off with shapes that never change, so this step reads and writes the cache differently from the eager path:

- every row attends over the whole cache length (`max_seq_len`), masked beyond its own position, instead of over a
  slice that grows by one each step (Hugging Face's static cache does the same);
- the batch is padded up to a bucket (1, 2, 4, ... up to `max_batch`, and `max_batch` itself), so a running batch
  of any size reuses one of a few graphs. Padding rows write position 0 of free slots, which the engine always
  overwrites before a request reads them (running requests live in slots 0..n-1; see `BatchEngine`).

Every bucket is compiled once by `warmup` (the engine calls it at start, seconds per bucket) so no request waits
for a compilation. The step is exact up to float rounding: greedy tokens match the eager engine's unless two logits
tie to within ~1e-6. Prefix-tuned models (their learned keys come from a Python callable) keep the eager step.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmforge.model.kv_cache import SlotKVCache
    from lmforge.model.transformer import Transformer

log = logging.getLogger(__name__)

__all__ = ["StaticDecoder", "buckets", "decode_step", "unsupported"]


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """T tokens for each of B rows: tokens [B, T] at positions [B, T] -> logits [B, T, vocab]. Their keys/values go
    to keys[layer][b, :, positions[b]] (each [slots >= B, n_kv_heads, L, head_dim]) and each token attends over
    positions 0..its own of its row's slot. The rotary tables must already cover L (`Transformer.rope(0, L)`)."""
    B, L = tokens.shape[0], keys[0].shape[2]
    x = model.embed(tokens, positions=positions)  # [B, T, d]
    cos, sin = model.rope_at(positions, L)  # [B, 1, T, head_dim]; (None, None) for learned positions
    mask = (torch.arange(L, device=tokens.device)[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, L]
    rows = torch.arange(B, device=tokens.device)[:, None]
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
        keys[i][rows, :, positions] = k.transpose(1, 2).to(keys[i].dtype)
        values[i][rows, :, positions] = v.transpose(1, 2).to(values[i].dtype)
        x = x + attn.attend(q, keys[i][:B].to(q.dtype), values[i][:B].to(q.dtype), mask, False)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.head(x)


def unsupported(model: Transformer) -> str | None:
    """Why `decode_step` cannot run this model, or None when it can."""
    if any(layer.self_attn.prefix_kv is not None for layer in model.model.layers):
        return "the model carries a tuned prefix (prefix tuning)"
    return None


def buckets(max_batch: int) -> list[int]:
    """The padded batch sizes: powers of two below max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


class StaticDecoder:
    """The compiled `decode_step` over one `SlotKVCache`: one token per running row, the batch padded to its bucket,
    and (with `draft` > 0) the verification of up to `draft` drafted tokens of the request in slot 0."""

    def __init__(self, model: Transformer, cache: SlotKVCache, max_batch: int, draft: int = 0) -> None:
        self.model, self.cache, self.draft = model, cache, draft
        self.sizes = buckets(max_batch)
        if model.rotary:
            model.rope(0, cache.max_len)  # tables for every position, built now and not inside the graph
        # One graph per bucket, and one for verification: raise dynamo's per-function limit so none falls back.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), len(self.sizes) + 5))
        self.device = cache.device
        # On the CPU the graph's own Python wrapper (a call per kernel) is a fifth of a small model's step: the
        # C++ wrapper removes it.
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        self._fn = torch.compile(decode_step, dynamic=False, fullgraph=True, options=options)

    def bucket(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [n, vocab] of the n running rows (slots 0..n-1), each fed its token at its position."""
        n = len(tokens)
        pad = self.bucket(n) - n
        t = torch.tensor(tokens + [0] * pad, dtype=torch.long, device=self.device)[:, None]
        p = torch.tensor(positions + [0] * pad, dtype=torch.long, device=self.device)[:, None]
        return self._fn(self.model, t, p, self.cache.k, self.cache.v)[:n, 0]

    def verify(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits [len(tokens), vocab] of slot 0 fed `tokens` (its next token and at most `draft` drafted ones) at
        positions start, start + 1, ...; padded to draft + 1 tokens whose writes land past the real ones (the last
        position at most, which no real token of this call fills: start + len(tokens) < the cache's length)."""
        n, width, last = len(tokens), self.draft + 1, self.cache.max_len - 1
        t = torch.tensor([tokens + [0] * (width - n)], dtype=torch.long, device=self.device)
        p = torch.tensor([[min(start + j, last) for j in range(width)]], dtype=torch.long, device=self.device)
        return self._fn(self.model, t, p, self.cache.k, self.cache.v)[0, :n]

    @torch.inference_mode()
    def warmup(self) -> float:
        """Compile every graph now (on free slots: call before any request runs); the seconds it took."""
        start = time.perf_counter()
        for b in self.sizes:
            self([0] * b, [0] * b)
        if self.draft:
            self.verify([0], 0)
        seconds = time.perf_counter() - start
        log.info("compiled the decode step for batch sizes %s%s in %.1f s", self.sizes,
                 f" and the verification of {self.draft} drafted tokens" if self.draft else "", seconds)  # fmt: skip
        return seconds
