"""What generate and chat run: an lmforge checkpoint, or the Hugging Face folder `lmforge export` wrote from one.

An export is loaded by transformers (`lmforge.hf.load_causal_lm`, as evaluation loads it) and wrapped in
`TransformersModel`, which the engine drives like an lmforge Transformer: `model(ids, cache=...)` returns logits
and `model.args.max_seq_len` is the context. Its cache is transformers' own (past_key_values) plus the ids it
holds; a caller that rewinds `cache.pos` (a chat reusing the prefix it shares with the last turn) gets the keys
and values recomputed up to there. The tokenizer is lmforge's, read from the export's tokenizer.json, so the chat
template, the stop tokens and streaming decode are exactly those of the checkpoint it came from; a transformers
folder that lmforge did not export (other special tokens) is refused with a message saying so.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lmforge.model.io import META, TOKENIZER, load_checkpoint_tokenizer, load_model, not_a_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.device import resolve_device

HF_CONFIG = "config.json"


class PastCache:
    """The cache `TransformersModel` keeps for the engine: transformers' past_key_values and the ids behind it."""

    def __init__(self, batch_size: int, max_len: int, device: torch.device) -> None:
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.pos = 0  # the positions a caller may rely on; the engine sets it back to reuse a prefix
        self.past: Any = None
        self.past_len = 0  # the positions `past` holds


class TransformersModel(nn.Module):
    """A transformers causal LM behind the interface lmforge's generation engine drives (see the module docstring)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.args = SimpleNamespace(max_seq_len=int(hf.config.max_position_embeddings))
        # transformers 5 renamed past_key_values (argument and output) to cache.
        self._cache_name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def new_cache(self, batch_size: int, max_len: int) -> PastCache:
        return PastCache(batch_size, max_len, next(self.parameters()).device)

    def forward(self, ids: torch.Tensor, cache: PastCache | None = None) -> torch.Tensor:
        if cache is None:
            return self.hf(input_ids=ids, use_cache=False).logits
        end = cache.pos + ids.shape[1]
        if end > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions cannot hold {end}")
        cache.ids[:, cache.pos : end] = ids
        if cache.past is not None and cache.past_len == cache.pos:
            out = self.hf(input_ids=ids, use_cache=True, **{self._cache_name: cache.past})
            logits = out.logits
        else:  # a new cache, or one rewound: run everything it should hold
            out = self.hf(input_ids=cache.ids[:, :end], use_cache=True)
            logits = out.logits[:, cache.pos :]
        cache.past, cache.pos, cache.past_len = getattr(out, self._cache_name), end, end
        return logits


def load_for_generation(path: Path, device: str = "auto") -> tuple[nn.Module, Tokenizer]:
    """The model (on `device`: auto, cpu, cuda or cuda:N) and tokenizer of an lmforge checkpoint or its export."""
    path = Path(path)
    dev = resolve_device(device)
    if (path / META).is_file():
        model, _ = load_model(path, device=dev)
        return model.eval(), load_checkpoint_tokenizer(path)
    if not (path / HF_CONFIG).is_file():
        raise not_a_checkpoint(path, transformers_too=True)
    try:
        tokenizer = Tokenizer.from_file(path / TOKENIZER)
        if tokenizer.imported is not None:  # Tokenizer reads it; whether generate runs such a model is import's call
            raise ValueError("its tokenizer has other special tokens than lmforge's")
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{path} is a transformers model directory that lmforge did not export ({e}); generate "
                         "and chat read lmforge checkpoints and the folders `lmforge export` writes") from e
    from lmforge.hf import load_causal_lm

    return TransformersModel(load_causal_lm(path, dev)).eval(), tokenizer
