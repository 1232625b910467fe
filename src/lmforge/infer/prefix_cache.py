"""Prompt-prefix caching for the batching engine: a new prompt that starts like an earlier sequence skips that part.

When a request leaves the engine, the keys/values its slot holds (its prompt and the tokens fed back after it) are
copied here under their token ids. A new prompt reuses the longest common start with any stored sequence (always
leaving at least its last token to run, whose logits give the first new token): those positions are copied into
its slot and only the rest of the prompt is prefilled. A chat's next turn, whose prompt repeats the conversation so
far, then runs only the new message. Keys/values at a position depend only on the tokens up to it, so a common start
gives the same keys/values (up to float rounding from running it in one chunk or another).

Entries are kept least recently used first and evicted when they hold more than `max_tokens` positions in all; a
stored sequence that is a start of a newer one is dropped for it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from lmforge.model.kv_cache import SlotKVCache


def common_start(a: tuple[int, ...], b: list[int]) -> int:
    """The number of leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Stored keys/values [n_layers x (k, v) [n_kv_heads, n, head_dim]] by token ids, at most `max_tokens` in all."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.tokens = 0

    def store(self, tokens: list[int], cache: SlotKVCache, slot: int) -> None:
        """Keep the first len(tokens) positions of `slot` (which must hold them) under `tokens`."""
        n = len(tokens)
        if n == 0 or n > self.max_tokens or cache.lens[slot] < n:
            return
        key = tuple(tokens)
        for old in [e for e in self.entries if len(e) <= n and key[: len(e)] == e]:
            self._drop(old)
        layers = zip(cache.k, cache.v, strict=True)
        self.entries[key] = [(k[slot, :, :n].clone(), v[slot, :, :n].clone()) for k, v in layers]
        self.tokens += n
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self.entries)))

    def load(self, prompt: list[int], cache: SlotKVCache, slot: int) -> int:
        """Fill `slot` with the longest stored start of `prompt` (all but its last token at most); its length."""
        best, best_n = None, 0
        for key in self.entries:
            n = min(common_start(key, prompt), len(prompt) - 1)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            cache.clear(slot)
            return 0
        self.entries.move_to_end(best)
        for (k, v), ck, cv in zip(self.entries[best], cache.k, cache.v, strict=True):
            ck[slot, :, :best_n] = k[:, :best_n]
            cv[slot, :, :best_n] = v[:, :best_n]
        cache.lens[slot] = best_n
        return best_n

    def _drop(self, key: tuple[int, ...]) -> None:
        del self.entries[key]
        self.tokens -= len(key)
