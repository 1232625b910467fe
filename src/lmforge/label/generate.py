"""Candidates from models: each checkpoint replies to every prompt through its own chat template (lmforge's, or an
imported model's Jinja template), with the KV-cache engine. The replies of two or more checkpoints to one prompt
make one candidates item (lmforge.label.candidates) for people or a judge to compare.

Sampling is seeded per prompt and checkpoint position, so a rerun writes the same file and adding prompts does not
change the replies to the others. A prompt too long for a model's context is skipped and counted (for every model,
so each item holds a reply from each checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.align.prompts import PromptItem
from lmforge.align.rollout import prompt_seed
from lmforge.finetune.data import Skipped
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import generate
from lmforge.infer.loading import load_for_generation
from lmforge.label.candidates import Candidate, Response
from lmforge.model.modes import evaluating

log = logging.getLogger(__name__)

_META_KEYS = ("answer", "tests", "test_setup", "entry_point", "code_prompt", "reference")


def _reference(meta: dict[str, Any]) -> str | None:
    """What a verifier checks a reply against: the exact answer, else the tests, one per line."""
    if meta.get("answer") is not None:
        return str(meta["answer"])
    if meta.get("tests"):
        return "\n".join(meta["tests"])
    return None


def _replies(checkpoint: Path, prompts: Sequence[PromptItem], skip: set[int], position: int, *,
             max_new_tokens: int, temperature: float, seed: int, device: str) -> dict[int, str]:  # fmt: skip
    """Reply text per prompt index (those not in `skip`); indexes whose prompt does not fit are added to `skip`."""
    model, tok = load_for_generation(checkpoint, device=device)
    context = model.args.max_seq_len
    out: dict[int, str] = {}
    with evaluating(model):
        for i, item in enumerate(prompts):
            if i in skip:
                continue
            ids_i = prompt_ids(tok, item.messages)
            if len(ids_i) + 1 >= context:
                skip.add(i)
                continue
            new = min(max_new_tokens, context - len(ids_i))
            # One prompt per call: the engine groups equal lengths, and a per-prompt seed keeps replies stable.
            tokens = generate(model, [ids_i], new, temperature=temperature, stop_ids=tok.stop_ids,
                              seed=prompt_seed(seed, i, position))[0]  # fmt: skip
            out[i] = tok.decode(tokens, skip_special_tokens=True).strip()
    log.info("%s: %d replies", checkpoint, len(out))
    return out


def generate_candidates(prompts: Sequence[PromptItem], checkpoints: dict[str, Path], *, max_new_tokens: int = 128,
                        temperature: float = 0.7, seed: int = 0, device: str = "auto",
                        ids: Sequence[str] | None = None) -> tuple[list[Candidate], Skipped]:  # fmt: skip
    """One item per prompt with a reply from each checkpoint (named by the dict's keys, at least two), and the
    prompts skipped (too long for a model's context, or a model gave an empty reply) with why."""
    if len(checkpoints) < 2:
        raise ValueError(f"candidates compare at least two checkpoints, got {len(checkpoints)}: {list(checkpoints)}")
    if ids is not None and len(ids) != len(prompts):
        raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
    names = [str(item.meta.get("id") or f"p{i}") for i, item in enumerate(prompts)] if ids is None else list(ids)
    skip: set[int] = set()
    replies = {name: _replies(Path(path), prompts, skip, position, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed, device=device)
               for position, (name, path) in enumerate(checkpoints.items())}  # fmt: skip
    skipped, items = Skipped(), []
    for i, item in enumerate(prompts):
        where = str(item.meta.get("source") or f"prompt {i}")
        if i in skip:
            skipped.add(where, "too long: the prompt leaves no room for a reply in a model's context")
            continue
        responses = [Response(name, replies[name][i]) for name in checkpoints]
        empty = [r.model for r in responses if not r.content]
        if empty:
            skipped.add(where, f"empty reply: {', '.join(empty)} replied nothing")
            continue
        meta = {k: item.meta[k] for k in _META_KEYS if item.meta.get(k) is not None}
        items.append(Candidate(names[i], list(item.messages), responses, _reference(item.meta), meta))
    return items, skipped
