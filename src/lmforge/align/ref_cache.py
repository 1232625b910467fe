"""Reference log-probabilities of preference pairs, computed once with the frozen starting model and cached.

The DPO family compares the policy with the model it started from. The reference never changes, so its
per-sequence log-probabilities (sum over the reply tokens, and their count, for the chosen and the rejected side)
are computed once, before training, and read by pair index at every step: a DPO step then runs one forward (the
policy's) instead of two, and holds one model instead of two.

    directory/meta.json               the cache's key (a fingerprint of the rendered pairs and of the model), the
                                      number of pairs and the chunk size
    directory/chunk_00000.safetensors chosen_logp, chosen_tokens, rejected_logp, rejected_tokens of one chunk of
                                      `chunk_size` pairs, in pair order

Each chunk is written atomically as soon as it is done, so a run killed half-way keeps its finished chunks and
computes only the rest when started again. A cache whose key differs (other pairs, another tokenizer or max_len,
another checkpoint) is removed and recomputed. Files are safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.align.losses import sequence_logps
from lmforge.align.pair_batches import collate_pairs, split_sides
from lmforge.align.preferences import RenderedPair
from lmforge.io import atomic_path, atomic_write_json
from lmforge.model.modes import evaluating

log = logging.getLogger(__name__)

META = "meta.json"
FIELDS = ("chosen_logp", "chosen_tokens", "rejected_logp", "rejected_tokens")


@dataclass(frozen=True)
class ReferenceLogps:
    """Per-pair reference log-probabilities [N] (fp32 sums over the reply tokens) and reply token counts [N]."""

    chosen_logp: Tensor
    chosen_tokens: Tensor
    rejected_logp: Tensor
    rejected_tokens: Tensor

    def take(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(log-probabilities [2B], token counts [2B]) of the pairs `index` [B], chosen then rejected, as a collated
        batch lays its rows out."""
        index = index.cpu()
        logp = torch.cat([self.chosen_logp[index], self.rejected_logp[index]])
        tokens = torch.cat([self.chosen_tokens[index], self.rejected_tokens[index]])
        return logp, tokens


def pairs_fingerprint(pairs: Sequence[RenderedPair], model_key: str) -> str:
    """A key for the cache: the rendered pairs (ids and labels of both sides) and `model_key` (the checkpoint's
    fingerprint), so that other data, another tokenizer, max_len or model makes another key."""
    digest = hashlib.sha256(model_key.encode())
    for p in pairs:
        digest.update(json.dumps([p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels]).encode())
    return digest.hexdigest()


def pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """One forward over a collated batch of pairs: per-row summed log-probabilities [2B] and token counts [2B]."""
    device = next(model.parameters()).device
    return sequence_logps(model(batch["input_ids"].to(device)), batch["labels"].to(device))


def compute_reference(model: nn.Module, pairs: Sequence[RenderedPair], pad_id: int, batch_size: int) -> ReferenceLogps:
    """The reference log-probabilities of `pairs` in memory, in batches of `batch_size` pairs in pair order."""
    parts: dict[str, list[Tensor]] = {name: [] for name in FIELDS}
    with evaluating(model), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            logp, tokens = pair_logps(model, collate_pairs(pairs[start : start + batch_size], pad_id))
            (chosen, rejected), (n_chosen, n_rejected) = split_sides(logp.cpu()), split_sides(tokens.cpu())
            for name, value in zip(FIELDS, (chosen, n_chosen, rejected, n_rejected)):
                parts[name].append(value)
    return ReferenceLogps(*(torch.cat(parts[name]) for name in FIELDS))


def _chunk_path(directory: Path, k: int) -> Path:
    return directory / f"chunk_{k:05d}.safetensors"


def _open_cache(directory: Path, meta: dict) -> None:
    """Keep a cache with this key (its finished chunks are reused); remove one with another key."""
    path = directory / META
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = None
        if old == meta:
            return
        log.info("%s holds reference log-probabilities of other pairs or another model; recomputing them", directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, meta)


def reference_logps(model: nn.Module, pairs: Sequence[RenderedPair], pad_id: int, directory: Path, model_key: str,
                    chunk_size: int = 64, batch_size: int = 8) -> ReferenceLogps:  # fmt: skip
    """The reference log-probabilities of `pairs` under `model`, read from the cache in `directory` where it has
    them and computed (and saved, chunk by chunk) where it does not. `model_key` names the model (a fingerprint of
    its checkpoint). Every chunk is computed in batches of `batch_size` pairs, so the values do not depend on
    which chunks a killed run had finished."""
    if chunk_size % batch_size:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of batch_size={batch_size}")
    directory = Path(directory)
    meta = {"key": pairs_fingerprint(pairs, model_key), "pairs": len(pairs), "chunk_size": chunk_size}
    _open_cache(directory, meta)
    chunks, computed = [], 0
    for k, start in enumerate(range(0, len(pairs), chunk_size)):
        path, part = _chunk_path(directory, k), pairs[start : start + chunk_size]
        if not path.exists():
            ref = compute_reference(model, part, pad_id, batch_size)
            with atomic_path(path) as tmp:
                save_file({name: getattr(ref, name).contiguous() for name in FIELDS}, str(tmp))
            computed += 1
        chunk = load_file(str(path))
        if any(chunk[name].shape != (len(part),) for name in FIELDS):
            raise ValueError(f"{path} does not hold {len(part)} pairs; delete {directory} to recompute the cache")
        chunks.append(chunk)
    log.info("reference log-probabilities of %d pairs: %d chunks computed, %d read from %s", len(pairs), computed,
             len(chunks) - computed, directory)  # fmt: skip
    return ReferenceLogps(*(torch.cat([c[name] for c in chunks]) for name in FIELDS))
