"""Text embeddings from a checkpoint, and a retrieval task to measure them.

An embedding is the L2-normalised mean of the backbone's final hidden states over a text's tokens, read with
bidirectional attention: the representation the contrastive objective trains (`objectives.pooled_embeddings`).

The retrieval task pairs each documented function of the Python standard library's non-test modules with its own
code (the pairs of lmforge.data.code_pairs, the extractor the sft stage uses): the query is the first paragraph of
the docstring, the document is the function's source with the docstring cut out, and a query must find its
function among all the functions of the split. Files are held out by the rule the sft stage's pairs follow,
curation's validation split (a hash of the path at the default run's `data.val_fraction`), so the split never
changes, the methods of one class stay on one side, and the held-out files are the ones the default run's
pre-training never saw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.io import atomic_open, atomic_write_text
from lmforge.model.modes import evaluating
from lmforge.data.code_pairs import CodePair, pairs_from_documents
from lmforge.data.config import DataConfig
from lmforge.data.curate import split_of
from lmforge.data.readers import stdlib_root, stdlib_source_files
from lmforge.data.batches import ShuffledRows
from lmforge.objectives import contrastive_pairs, pooled_embeddings
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# The default run's data.val_fraction: the held-out files are those its curate stage puts in curate/val.
HELD_OUT_FRACTION = DataConfig().val_fraction
MIN_QUERY_WORDS = 4
MIN_CODE_LINES = 3  # the def line and at least two lines of body
IDS_SUFFIX = ".ids.txt"  # beside OUT.npy: one document id per row


@torch.no_grad()
def embed_texts(
    model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32, max_len: int = 256
) -> np.ndarray:
    """[len(texts), d] float32, unit-norm rows. Each text is BOS + its first max_len - 1 tokens, as documents
    start in training; texts of similar length are batched together so little padding is computed."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    device = next(model.parameters()).device
    ids = [[tokenizer.doc_start_id] + t[: max_len - 1] for t in tokenizer.encode_batch(list(texts))]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: np.ndarray | None = None
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = True
            emb = pooled_embeddings(model, input_ids.to(device), mask.to(device)).cpu().numpy()
            if out is None:
                out = np.empty((len(ids), emb.shape[1]), dtype=np.float32)
            out[chunk] = emb
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def retrieval_recall(query_emb: np.ndarray, doc_emb: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Recall@k of query i retrieving doc i by dot product, for each k: {"recall@1": ..., "recall@10": ...}.

    A query's rank counts the other docs scoring at least as high as its own doc, so ties count against it:
    constant embeddings score 0 for every k below the number of docs, not 1.
    """
    if len(query_emb) != len(doc_emb) or len(query_emb) == 0:
        raise ValueError(f"need one doc per query and at least one pair, got {len(query_emb)} and {len(doc_emb)}")
    scores = query_emb.astype(np.float64) @ doc_emb.astype(np.float64).T
    own = np.diag(scores)
    rank = (scores >= own[:, None]).sum(axis=1) - 1
    return {f"recall@{k}": float((rank < k).mean()) for k in ks}


def _retrievable(pair: CodePair) -> bool:
    """A query of a few words, and code of at least the def line and two more."""
    code_lines = sum(1 for line in pair.code.splitlines() if line.strip())
    return len(pair.summary.split()) >= MIN_QUERY_WORDS and code_lines >= MIN_CODE_LINES


def _stdlib_sources(held_out: bool, val_fraction: float) -> Iterator[tuple[str, str]]:
    """(path relative to the stdlib root, source) of the non-test modules on one side of the held-out rule."""
    root = stdlib_root()
    for path in stdlib_source_files(include_tests=False):
        rel = path.relative_to(root).as_posix()
        if (split_of(rel, val_fraction) == "val") != held_out:
            continue
        try:
            yield rel, path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            log.debug("%s: skipped (%s)", rel, e)


def stdlib_pairs(split: str = "test", max_pairs: int | None = None,
                 val_fraction: float = HELD_OUT_FRACTION) -> list[CodePair]:  # fmt: skip
    """Docstring -> code pairs from the standard library's non-test modules, in file order; `split` is "test" (the
    files curation would hold out at `val_fraction`, lmforge.data.code_pairs) or "train" (the rest, without the
    prompts of held-out pairs). `max_pairs` keeps an evenly spread subset of that many."""
    if split not in ("train", "test"):
        raise ValueError(f"split = {split!r}: allowed values are ['train', 'test']")
    prompts: set[str] = set()
    pairs, _ = pairs_from_documents(_stdlib_sources(True, val_fraction), prompts)
    if split == "train":
        pairs, _ = pairs_from_documents(_stdlib_sources(False, val_fraction), prompts)
    # The same query for two functions (overloads, copies) would make recall ill-defined; keep the first.
    queries: set[str] = set()
    unique = []
    for pair in filter(_retrievable, pairs):
        if pair.summary not in queries:
            queries.add(pair.summary)
            unique.append(pair)
    if max_pairs is not None and len(unique) > max_pairs:
        unique = [unique[i] for i in np.linspace(0, len(unique) - 1, max_pairs).round().astype(int)]
    return unique


def pairs_recall(
    model: nn.Module, tokenizer: Tokenizer, pairs: Sequence[CodePair], batch_size: int = 32, max_len: int = 256,
    ks: Sequence[int] = (1, 10),
) -> dict[str, float]:  # fmt: skip
    """Recall@k of each pair's query retrieving its own code among all the pairs' code."""
    queries = embed_texts(model, tokenizer, [p.summary for p in pairs], batch_size, max_len)
    docs = embed_texts(model, tokenizer, [p.code for p in pairs], batch_size, max_len)
    return retrieval_recall(queries, docs, ks)


def write_embeddings(path: Path, emb: np.ndarray, ids: Sequence[str]) -> None:
    """`path` (.npy) and, beside it, `<path>.ids.txt` naming each row's document, both written atomically."""
    with atomic_open(path, "wb") as f:
        np.save(f, emb)
    atomic_write_text(Path(f"{path}{IDS_SUFFIX}"), "".join(f"{i}\n" for i in ids))


class PairBatches(ShuffledRows):
    """Endless batches of (query, code) pairs in the contrastive-views layout: rows i and B+i are one pair.

    Every text is BOS plus at most max_len - 1 tokens, right-padded with PAD. Pairs are visited in a permutation
    drawn from `default_rng((seed, epoch))` (lmforge.data.batches.ShuffledRows), so the state is two integers and a
    restored loader repeats exactly. A batch's loss tokens are its pairs.
    """

    def __init__(self, pairs: Sequence[CodePair], tokenizer: Tokenizer, batch_size: int, max_len: int,
                 seed: int) -> None:  # fmt: skip
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} pairs are fewer than one batch of {batch_size}")
        super().__init__(len(pairs), batch_size, seed)
        encode = lambda text: [tokenizer.doc_start_id] + tokenizer.encode(text)[: max_len - 1]  # noqa: E731
        self.queries = [encode(p.summary) for p in pairs]
        self.codes = [encode(p.code) for p in pairs]
        self.pad_id = tokenizer.pad_id

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = self._next_rows()
        rows = [self.queries[i] for i in picked] + [self.codes[i] for i in picked]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        return {"input_ids": ids, "mask": torch.arange(width)[None, :] < lengths[:, None]}

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return contrastive_pairs(batch)


def finetune_on_pairs(
    checkpoint: Path, out_dir: Path, *, steps: int, batch_size: int = 32, lr: float = 1e-3,
    temperature: float = 0.05, max_len: int = 256, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Contrastive fine-tuning on the training split of the stdlib docstring -> code pairs (held-out files never
    seen), through the one training loop; the model lands in `out_dir/final/`. Returns the loop's metrics."""
    from functools import partial

    from lmforge.model.io import load_model, write_model_files
    from lmforge.objectives import contrastive_loss
    from lmforge.train.config import TrainConfig
    from lmforge.outdir import inputs_fingerprint, start_job
    from lmforge.train.loop import OUTPUTS, train

    from lmforge.model.io import load_checkpoint_tokenizer, require_checkpoint

    checkpoint = require_checkpoint(checkpoint)  # before the output folder is made
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "temperature": temperature, "max_len": max_len,
                "seed": seed}  # fmt: skip
    start_job(out_dir, "embed --finetune-steps", settings, {"checkpoint": inputs_fingerprint(checkpoint)}, OUTPUTS)
    model, args = load_model(checkpoint, dtype=torch.float32)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    max_len = min(max_len, args.max_seq_len)
    loader = PairBatches(stdlib_pairs("train"), tokenizer, batch_size, max_len, seed)
    cfg = TrainConfig(seq_len=max_len, batch_size=batch_size, max_steps=steps, lr=lr,
                      warmup_steps=max(1, steps // 10), eval_every=steps, ckpt_every=steps, seed=seed)  # fmt: skip
    return train(model, partial(contrastive_loss, temperature=temperature), loader, cfg, out_dir,
                 write_model_files=lambda m, d: write_model_files(m, args, d, checkpoint / "tokenizer.json"))  # fmt: skip
