"""The scoring engine every evaluation task runs on: log-likelihoods of continuations, rolling log-likelihoods of
whole texts, and greedy generation, for an lmforge checkpoint or a Hugging Face model directory.

The conventions are lm-evaluation-harness's, so that numbers line up with the field's and with the lm-eval
adapter (lmforge.eval.lm_eval_adapter):

- a (context, continuation) pair is tokenized as the whole string, and the continuation's tokens are those past
  the context's own tokens (`encode_pair`), with trailing spaces of the context moved to the continuation;
- a sequence starts with the model's BOS (lmforge models always train with one);
- when a pair is longer than the context window, it keeps its last `max_len + 1` tokens;
- `greedy` is true when every continuation token is the argmax of its position.

`generate_until(..., chat=True)` prompts a fine-tuned model through its chat template instead: each prompt becomes
one user message (lmforge models: `lmforge.finetune.template`, the template SFT trained on; transformers models:
the tokenizer's `chat_template`), and decoding also stops where the assistant's turn ends.

Batches are formed from requests sorted by length (longest first, so memory peaks at once and padding is small).
For lmforge models, pairs sharing a context (the choices of a multiple-choice question) run it once and share its
KV cache, and the output head runs only where a continuation token is predicted; see `loglikelihood_tokens`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.losses import cross_entropy

log = logging.getLogger(__name__)


@dataclass
class LanguageModel:
    """What scoring needs of a model, whatever its origin."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # ids [B, T] -> logits [B, T, V]
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    prefix: list[int]  # the tokens every sequence starts with (BOS; EOS for an lmforge tokenizer without BOS)
    eos_id: int | None
    max_len: int
    device: torch.device
    name: str
    module: torch.nn.Module | None = None  # an lmforge Transformer: generation then uses its KV cache
    tokenizer: Any = None  # its lmforge Tokenizer (code tasks sample through lmforge.infer)
    chat_prompt: Callable[[str], list[int]] | None = None  # a user message -> the ids prompting the reply
    chat_stop_ids: tuple[int, ...] = ()  # the tokens that end an assistant turn


def load_language_model(path: Path | str, device: str = "auto") -> LanguageModel:
    """An lmforge checkpoint or a Hugging Face model directory, in lmforge's backbone. A Hugging Face model of a
    family the backbone does not compute (lmforge.model.hf_import refuses it) is scored through transformers, so
    that any model can stand beside lmforge's as a baseline."""
    from lmforge.device import resolve_device
    from lmforge.model.io import is_hf_model_dir, read_model_args, require_checkpoint

    path = require_checkpoint(path)
    dev = resolve_device(device)
    if is_hf_model_dir(path):
        try:
            read_model_args(path)
        except ValueError as e:
            log.info("%s; scoring it through transformers instead", e)
            return _hf_model(path, dev)
    return _lmforge_model(path, dev)


def _lmforge_model(path: Path, device: torch.device) -> LanguageModel:
    from lmforge.infer.loading import load_for_generation

    model, tokenizer = load_for_generation(path, str(device))
    return from_lmforge(model, tokenizer, str(path))


def from_lmforge(model: torch.nn.Module, tokenizer, name: str = "model") -> LanguageModel:  # noqa: ANN001
    """An lmforge Transformer and its Tokenizer, already loaded."""
    from lmforge.infer.chat import user_prompt_ids

    model.eval()
    device = next(model.parameters()).device
    chat = tokenizer.has_chat_template
    return LanguageModel(forward=model, encode=tokenizer.encode, decode=lambda ids: tokenizer.decode(ids),
                         prefix=[tokenizer.doc_start_id], eos_id=tokenizer.eos_id, max_len=model.args.max_seq_len,
                         device=device, name=name, module=model, tokenizer=tokenizer,
                         chat_prompt=(lambda text: user_prompt_ids(tokenizer, text)) if chat else None,
                         chat_stop_ids=tuple(tokenizer.stop_ids if chat else tokenizer.eos_ids))  # fmt: skip


def _hf_model(path: Path, device: torch.device) -> LanguageModel:
    from lmforge.hf import load_causal_lm

    model = load_causal_lm(path, device)
    from transformers import AutoTokenizer  # present: load_causal_lm needed it

    tok = AutoTokenizer.from_pretrained(path)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    def chat_prompt(text: str) -> list[int]:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))  # fmt: skip

    # A chat model's generation config lists every token that ends its turn (the export: EOS and <|end|>).
    stops = getattr(model.generation_config, "eos_token_id", None)
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    stops = [t for t in dict.fromkeys(stops + [tok.eos_token_id]) if t is not None]
    has_template = bool(getattr(tok, "chat_template", None))
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    return LanguageModel(forward=forward, encode=lambda s: tok.encode(s, add_special_tokens=False),
                         decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                         prefix=[bos] if bos is not None else [], eos_id=tok.eos_token_id, max_len=max_len,
                         device=device, name=str(path), chat_prompt=chat_prompt if has_template else None,
                         chat_stop_ids=tuple(stops))  # fmt: skip


def encode_pair(lm: LanguageModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens with the prefix, continuation tokens), split where the context's own tokens end."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # "Answer: " + "Paris" scores " Paris", as the model would write it; newlines and tabs likewise
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = lm.encode(context + continuation)
    ctx = lm.encode(context)
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context ...{context[-40:]!r}")
    return lm.prefix + ctx, cont


@dataclass
class _Row:
    index: int
    tokens: list[int]  # inputs and targets: the model reads tokens[:-1] and predicts tokens[1:]
    n_cont: int  # the last n_cont targets are the continuation


def _rows(lm: LanguageModel, pairs: Sequence[tuple[list[int], list[int]]]) -> list[_Row]:
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        tokens = (ctx + cont)[-(lm.max_len + 1):]
        rows.append(_Row(i, tokens, min(len(cont), len(tokens) - 1)))
    return rows


def _progress(total: int, label: str, show: bool) -> Progress:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    return Progress(*columns, console=console, disable=not (show and console.is_terminal), transient=True)


@torch.inference_mode()
def loglikelihood_tokens(
    lm: LanguageModel,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 32,
    label: str = "scoring",
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether it is the greedy continuation) per token pair.

    For lmforge models, pairs that share their context tokens with other pairs (the choices of a question) run
    that context once: its KV cache is copied to one row per continuation (`_shared_context`). Every other pair
    is one padded row. Either way the output head and the log-softmax run only at the continuation positions,
    which for multiple choice are about a seventh of all positions.
    """
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    shared = {ctx: idx for ctx, idx in groups.items() if lm.module is not None and len(idx) > 1
              and all(len(ctx) + len(pairs[i][1]) <= lm.max_len + 1 for i in idx)}  # fmt: skip
    single = [i for ctx, idx in groups.items() if ctx not in shared for i in idx]
    with _progress(len(pairs), label, progress) as bar:
        task = bar.add_task(label, total=len(pairs))
        rows = sorted(_rows(lm, [pairs[i] for i in single]), key=lambda r: -len(r.tokens))
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            for r, res in zip(batch, _score_rows(lm, batch)):
                out[single[r.index]] = res
            bar.advance(task, len(batch))
        for chunk in _context_chunks(shared, pairs, batch_size):
            for i, res in _shared_context(lm, chunk, pairs):
                out[i] = res
            bar.advance(task, sum(len(idx) for _, idx in chunk))
    return out


def _head_logits(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states [N, d] of an lmforge model: the head and the soft-cap, as its forward."""
    logits = lm.module.lm_head(hidden)
    cap = lm.module.args.logit_softcap
    if cap is not None:
        logits = cap * torch.tanh(logits.float() / cap)
    return logits


def _pick(logits: torch.Tensor, targets: list[int], lengths: list[int]) -> list[tuple[float, bool]]:
    """Per span of `lengths` consecutive positions: summed target log-probability (minus the one cross-entropy)
    and whether every target is the argmax."""
    target = torch.tensor(targets, device=logits.device)
    picked = (-cross_entropy(logits, target, reduction="none")).double().cpu()
    hit = (logits.float().argmax(-1) == target).cpu()
    out, k = [], 0
    for n in lengths:
        out.append((float(picked[k : k + n].sum()), bool(hit[k : k + n].all())))
        k += n
    return out


def _score_rows(lm: LanguageModel, batch: list[_Row]) -> list[tuple[float, bool]]:
    """One padded batch of whole rows."""
    width = len(batch[0].tokens) - 1
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    rows_idx, pos_idx, targets = [], [], []
    for j, r in enumerate(batch):
        ids[j, : len(r.tokens) - 1] = torch.tensor(r.tokens[:-1])
        end = len(r.tokens) - 1  # positions whose next token is a target
        rows_idx += [j] * r.n_cont
        pos_idx += range(end - r.n_cont, end)
        targets += r.tokens[-r.n_cont :]
    ids = ids.to(lm.device)
    where = (torch.tensor(rows_idx, device=lm.device), torch.tensor(pos_idx, device=lm.device))
    if lm.module is not None:
        logits = _head_logits(lm, lm.module(ids, return_hidden=True)[where])
    else:
        logits = lm.forward(ids)[where]
    return _pick(logits, targets, [r.n_cont for r in batch])


def _context_chunks(shared: dict[tuple[int, ...], list[int]], pairs: Sequence[tuple[list[int], list[int]]],
                    batch_size: int) -> list[list[tuple[tuple[int, ...], list[int]]]]:  # fmt: skip
    """Contexts of one length per chunk (no padding, one cache position), at most `batch_size` continuation rows
    per chunk (a context with more continuations than that gets a chunk of its own)."""
    chunks: list[list[tuple[tuple[int, ...], list[int]]]] = []
    chunk: list[tuple[tuple[int, ...], list[int]]] = []
    rows = 0
    for ctx, idx in sorted(shared.items(), key=lambda item: len(item[0])):
        if chunk and (rows + len(idx) > batch_size or len(chunk[0][0]) != len(ctx)):
            chunks.append(chunk)
            chunk, rows = [], 0
        chunk.append((ctx, idx))
        rows += len(idx)
    return chunks + ([chunk] if chunk else [])


def _shared_context(lm: LanguageModel, chunk: list[tuple[tuple[int, ...], list[int]]],
                    pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[int, tuple[float, bool]]]:  # fmt: skip
    """Run each context once with a KV cache, copy the cache to its continuations' rows, then run those."""
    from lmforge.model.kv_cache import KVCache

    model = lm.module
    conts = [pairs[i][1] for _, idx in chunk for i in idx]
    counts = torch.tensor([len(idx) for _, idx in chunk], device=lm.device)
    width = max(len(x) for x in conts) - 1
    cache = KVCache.for_model(model, len(chunk), max_len=len(chunk[0][0]) + width)
    contexts = torch.tensor([list(ctx) for ctx, _ in chunk], device=lm.device)
    # The context's last position predicts each continuation's first token.
    hidden = model(contexts, cache=cache, return_hidden=True)[:, -1:].repeat_interleave(counts, dim=0)
    if width > 0:
        cache.k = [k.repeat_interleave(counts, dim=0) for k in cache.k]
        cache.v = [v.repeat_interleave(counts, dim=0) for v in cache.v]
        ids = torch.zeros((len(conts), width), dtype=torch.long)
        for j, x in enumerate(conts):
            ids[j, : len(x) - 1] = torch.tensor(x[:-1])
        hidden = torch.cat([hidden, model(ids.to(lm.device), cache=cache, return_hidden=True)], dim=1)
    rows_idx = torch.tensor([j for j, x in enumerate(conts) for _ in x], device=lm.device)
    pos_idx = torch.tensor([p for x in conts for p in range(len(x))], device=lm.device)
    results = _pick(_head_logits(lm, hidden[rows_idx, pos_idx]), [t for x in conts for t in x], [len(x) for x in conts])
    return list(zip([i for _, idx in chunk for i in idx], results))


def loglikelihood(lm: LanguageModel, requests: Sequence[tuple[str, str]], **kwargs) -> list[tuple[float, bool]]:
    """(log-probability of the continuation given the context, greedy?) per (context, continuation) request."""
    return loglikelihood_tokens(lm, [encode_pair(lm, c, x) for c, x in requests], **kwargs)


def rolling_windows(tokens: list[int], max_len: int, stride: int | None = None) -> list[tuple[list[int], int]]:
    """Windows (inputs + targets, number of new targets at the end) that predict every token after the first once.

    Each window holds up to max_len + 1 tokens. With `stride` < max_len they overlap, so every token after the
    first window is predicted with at least max_len - stride tokens of context; stride = max_len (the default) cuts
    disjoint windows, as lm-evaluation-harness does.
    """
    stride = stride or max_len
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    windows: list[tuple[list[int], int]] = []
    scored = 0  # targets 1..scored are done
    n = len(tokens)
    start = 0
    while scored < n - 1:
        end = min(start + max_len + 1, n)
        if end == n:  # the last window reaches back a full context, as lm-evaluation-harness's does
            start = max(0, n - max_len - 1)
        windows.append((tokens[start:end], end - 1 - scored))
        scored = end - 1
        start = start + stride
    return windows


def loglikelihood_rolling(
    lm: LanguageModel, texts: Iterable[str], *, stride: int | None = None, **kwargs
) -> list[float]:
    """Total log-probability of each text (from BOS), over sliding windows when longer than the context."""
    texts = list(texts)
    pieces: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        for window, new in rolling_windows(lm.prefix + lm.encode(text), lm.max_len, stride):
            pieces.append((window[: len(window) - new], window[len(window) - new :]))
            owners.append(i)
    scores = loglikelihood_tokens(lm, pieces, **kwargs)
    totals = [0.0] * len(texts)
    for owner, (logp, _) in zip(owners, scores):
        totals[owner] += logp
    return totals


@torch.inference_mode()
def generate_until(
    lm: LanguageModel, prompts: Sequence[str], *, until: Sequence[str] = (), max_new_tokens: int = 256,
    batch_size: int = 16, label: str = "generating", progress: bool = True, chat: bool = False,
) -> list[str]:  # fmt: skip
    """Greedy continuations, cut before the first of `until` (and at EOS). With `chat`, each prompt is a user
    message in the model's chat template and the reply also ends where the assistant's turn does."""
    if chat and lm.chat_prompt is None:
        raise ValueError(f"{lm.name} has no chat template (its tokenizer sets no chat_template), so it cannot be "
                         "prompted with chat messages; set eval.chat_template=false")  # fmt: skip
    from lmforge.infer.engine import cap_new_tokens

    # Prompts are cut from the start to fit, so half the context stays theirs.
    max_new_tokens = cap_new_tokens(max_new_tokens, lm.max_len, setting=f"{label}: max_new_tokens")
    encode = lm.chat_prompt if chat else lambda p: lm.prefix + lm.encode(p)
    stops = lm.chat_stop_ids if chat else ()
    outputs: list[str] = []
    with _progress(len(prompts), label, progress) as bar:
        task = bar.add_task(label, total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [encode(p)[-(lm.max_len - max_new_tokens):] for p in chunk]
            outputs.extend(_cut(lm.decode(new), until) for new in _greedy(lm, ids, max_new_tokens, stops))
            bar.advance(task, len(chunk))
    return outputs


def _cut(text: str, until: Sequence[str]) -> str:
    cuts = [text.find(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text


def _greedy(lm: LanguageModel, prompts: list[list[int]], max_new_tokens: int,
            stop_ids: Sequence[int] = ()) -> list[list[int]]:  # fmt: skip
    """Greedy new tokens of each prompt, each row ending before EOS or any of `stop_ids`."""
    if max_new_tokens >= lm.max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {lm.max_len} positions")
    if lm.module is not None:
        from lmforge.infer.engine import generate

        return generate(lm.module, prompts, max_new_tokens, temperature=0.0, eos_id=lm.eos_id, stop_ids=stop_ids)
    stops = {lm.eos_id, *stop_ids}
    outs = []
    for ids in prompts:  # transformers models: a plain greedy loop, one prompt at a time
        seq, new = list(ids), []
        for _ in range(max_new_tokens):
            nxt = int(lm.forward(torch.tensor([seq], device=lm.device))[0, -1].argmax())
            if nxt in stops:
                break
            seq.append(nxt)
            new.append(nxt)
        outs.append(new)
    return outs
