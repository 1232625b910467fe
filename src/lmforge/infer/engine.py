"""Generation: a preallocated KV cache, temperature / top-k / top-p sampling and streaming text.

Prompts are token ids used as given by `generate`; `stream_text` encodes text and prepends the document-start
token (BOS, or EOS for a tokenizer without BOS), because every training document starts with it. A prompt plus its new tokens must fit in the model's context: `generate` raises
ValueError for a longer request instead of silently dropping the start of the prompt. Callers that take a length
from a user or a setting pass it through `cap_new_tokens` first, which lowers it to what fits (saying so once) and
raises only when the prompt alone fills the context; `stream_text` does this itself.

Generation stops before EOS (`eos_id`; `stream_text`: every id of the tokenizer's `eos_ids`) and before any of
`stop_ids` (a chat reply also ends at the template's end of turn, `<|end|>`); the stop
token is never returned, streamed or fed back to the model. `stream_tokens` continues one prompt token by token and
can extend a caller's KV cache that already holds the prompt's start (a chat session's earlier turns).

Prompts are grouped by length and each group is decoded as one batch, so no padding, attention mask or
per-row positions are needed; a batch of different-length prompts gives the same greedy output as one prompt at a
time. Sampling draws from one generator seeded by `seed`, so a given batch of prompts is reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from lmforge.infer.sampling import keep_top_k, keep_top_p
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, V]; greedy when temperature == 0. Returns [B]."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    if top_p is not None:
        logits = keep_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_group(
    model: Transformer,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    use_cache: bool,
    cache: KVCache | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token [B] for equal-length prompts [B, T], max_new_tokens times (the caller may stop early).

    A given `cache` holds the keys and values of prompts[:, :cache.pos]: only the rest of the prompt is run, and
    every token the caller asks for after the first is fed to it, so it ends holding cache.pos positions.
    """
    B, T = prompts.shape
    if cache is None and use_cache:
        cache = KVCache.for_model(model, B, T + max_new_tokens)
    seq = prompts
    logits = model(prompts[:, cache.pos :] if cache is not None else prompts, cache=cache)[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield token
        if step == max_new_tokens - 1:
            return
        if cache is not None:
            logits = model(token[:, None], cache=cache)[:, -1]
        else:
            seq = torch.cat([seq, token[:, None]], dim=1)
            logits = model(seq)[:, -1]


def prompt_too_long(prompt_tokens: int, max_seq_len: int) -> ValueError:
    """The one error for a prompt that leaves no room in the context for a new token."""
    return ValueError(f"the prompt alone has {prompt_tokens} tokens and the model's context is {max_seq_len} tokens: "
                      "shorten the prompt")  # fmt: skip


def cap_new_tokens(requested: int, max_seq_len: int, prompt_tokens: int | None = None, *,
                   setting: str = "max_new_tokens") -> int:  # fmt: skip
    """`requested` new tokens, or as many as fit in the model's context, logging the cap (naming `setting`).

    After a known prompt, everything the prompt leaves fits (ValueError when it leaves nothing). Before the prompt
    is known (a chat's turns, a batch of task prompts cut to fit), half the context is kept for the prompt.
    """
    if prompt_tokens is None:
        room, why = max(max_seq_len // 2, 1), "keeping half of it for the prompt"
    elif prompt_tokens >= max_seq_len:
        raise prompt_too_long(prompt_tokens, max_seq_len)
    else:
        room, why = max_seq_len - prompt_tokens, f"after the {prompt_tokens}-token prompt"
    if requested <= room:
        return requested
    log.warning("%s=%d does not fit the model's %d-token context %s: generating at most %d new tokens",
                setting, requested, max_seq_len, why, room)  # fmt: skip
    return room


def _validate_prompts(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = model.args.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; start it with the BOS token")
        if len(p) + max_new_tokens > limit:
            if len(p) >= limit:
                raise prompt_too_long(len(p), limit)
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
                f"max_seq_len={limit}. Shorten the prompt or ask for fewer tokens."
            )


def make_generator(model: Transformer, seed: int | None) -> torch.Generator | None:
    """A generator on the model's device seeded by `seed`; None (torch's global one) when seed is None."""
    if seed is None:
        return None
    gen = torch.Generator(device=next(model.parameters()).device)
    gen.manual_seed(seed)
    return gen


def _stop_set(eos_id: int | None, stop_ids: Iterable[int]) -> frozenset[int]:
    return frozenset(stop_ids) | ({eos_id} if eos_id is not None else set())


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
    include_stop: bool = False,
) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens per prompt, stopping a row before eos_id or any of
    stop_ids (the stop token is not returned, unless `include_stop`: then a row that stopped ends with it, which
    an RL loss trains as the end of the turn)."""
    check_sampling(temperature, top_k, top_p)
    _validate_prompts(model, prompts, max_new_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    stops = _stop_set(eos_id, stop_ids)
    device = next(model.parameters()).device
    generator = make_generator(model, seed)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        batch = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        done = [False] * len(rows)
        steps = _decode_group(
            model, batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, use_cache=use_cache,
        )
        for token in steps:
            for j, t in enumerate(token.tolist()):
                if done[j]:
                    continue
                done[j] = t in stops
                if not done[j] or include_stop:
                    out[rows[j]].append(t)
            if all(done):
                break
    return out


@torch.inference_mode()
def stream_tokens(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are sampled, stopping before any of stop_ids (never yielded).

    `generator`, when given, is drawn from instead of a fresh one seeded by `seed` (a chat session keeps one for
    all its turns). `cache`, when given, is a batch-1 cache holding the keys and values of prompt[:cache.pos]
    (the start it shares with an earlier generation): only the rest of the prompt is run, and the cache is
    extended in place, so afterwards it holds (prompt + yielded tokens)[:cache.pos].
    """
    check_sampling(temperature, top_k, top_p)
    _validate_prompts(model, [prompt], max_new_tokens)
    if cache is not None and not 0 <= cache.pos < len(prompt):
        raise ValueError(f"the cache holds {cache.pos} positions; it must hold fewer than the prompt's {len(prompt)}")
    if max_new_tokens == 0:
        return
    stops = frozenset(stop_ids)
    device = next(model.parameters()).device
    steps = _decode_group(
        model, torch.tensor([prompt], dtype=torch.long, device=device), max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, generator=generator if generator is not None else make_generator(model, seed),
        use_cache=True, cache=cache,
    )  # fmt: skip
    for token in steps:
        t = int(token[0])
        if t in stops:
            return
        yield t


def decode_stream(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of a stream of token ids, piece by piece, each piece as soon as it ends on a whole character.

    A character split over several byte-level tokens arrives whole: tokens are held back while their text ends in
    an incomplete UTF-8 sequence (U+FFFD). Only the held-back tokens are decoded at each step, which is exact
    because decoded text that ends on a whole character never changes when more bytes follow. The pieces join to
    the decode of all the tokens; special tokens are skipped.
    """
    pending: list[int] = []
    for t in tokens:
        pending.append(t)
        text = tokenizer.decode(pending, skip_special_tokens=True)
        if text and not text.endswith("\ufffd"):
            yield text
            pending = []
    text = tokenizer.decode(pending, skip_special_tokens=True) if pending else ""
    if text:  # a stream cut mid-character ends with what it has (a replacement character for the partial one)
        yield text


def stream_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    add_bos: bool = True,
    stop_ids: Iterable[int] = (),
) -> Iterator[str]:
    """The continuation of `prompt`, piece by piece (see `decode_stream`); it stops before the tokenizer's EOS
    and before any of `stop_ids`, whose text is never emitted. The pieces join to the decode of all new tokens.

    `max_new_tokens` is capped to what fits after the prompt (see `cap_new_tokens`). The checks run on the call,
    before any piece is asked for, so a caller can report a prompt that is too long before printing anything.
    """
    ids = ([tokenizer.doc_start_id] if add_bos else []) + tokenizer.encode(prompt)
    max_new_tokens = cap_new_tokens(max_new_tokens, model.args.max_seq_len, len(ids))
    check_sampling(temperature, top_k, top_p)
    tokens = stream_tokens(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           stop_ids=_stop_set(None, [*tokenizer.eos_ids, *stop_ids]), seed=seed)  # fmt: skip
    return decode_stream(tokenizer, tokens)
