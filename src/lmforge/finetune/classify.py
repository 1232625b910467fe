"""Transfer learning to a new task head: a frozen pre-trained backbone and a linear classifier on its features.

    train_classifier(checkpoint, data, out_dir)      -> metrics; writes out_dir/classifier/ and out_dir/metrics.json
    load_classifier(out_dir / "classifier").predict(texts) -> (labels, probabilities [N, n_classes])

Why features are computed once: the backbone is frozen, so a text's pooled feature never changes during training.
Each text goes through the backbone exactly once (batched, no grad); the head (`Linear(d_model, n_classes)`) then
trains for many epochs on the cached [N, d_model] matrix, each step a small matmul instead of a forward pass. On
3,395 EnterprisePII passages and the default 3-block model (2-core CPU) the one pass took ~40 s and 30 head epochs
~2 s; running the backbone every epoch would have taken ~20 minutes.

Pooling: each text is BOS + its tokens, cut to the model's `max_seq_len` (the cut is counted and logged), and
right-padded in a batch. With causal attention a real token never attends to the padding after it, so the padding
needs no mask, only to be left out of the pooling: "last" reads the hidden state of the last real token (causal:
the one that has seen the whole text); "mean" averages the text's tokens (BOS left out: its state is the same for
every text).

The head: softmax regression (cross-entropy, AdamW, seeded shuffles, zero start: the problem is convex) on
features standardised with the training split's mean and std; the standardisation is then folded into the Linear's
weight and bias, so the saved head reads raw features. `class_weighting` weights each class by
n / (n_classes * its count), for skewed label sets; it is off by default.

Data: see lmforge.finetune.labelled (.jsonl, .json, .csv or .tsv; fields auto-detected; bad records skipped and
counted with file:line; a seeded split stratified by label).

Outputs (written atomically):
    out_dir/classifier/head.safetensors   the head: "weight" [n_classes, d_model], "bias" [n_classes]
    out_dir/classifier/classifier.json    labels, pooling, d_model, the backbone's path and sha256, fields, metrics
    out_dir/metrics.json                  the metrics train_classifier returns
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import Tensor, nn

from lmforge.io import atomic_write_json
from lmforge.stats import proportion
from lmforge.finetune.labelled import Label, label_vocab, read_labelled, stratified_split
from lmforge.io import staged_dir
from lmforge.model.io import WEIGHTS, load_checkpoint_tokenizer, load_model, require_checkpoint
from lmforge.model.modes import evaluating
from lmforge.model.transformer import Transformer
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

POOLINGS = ("last", "mean")
CLASSIFIER_DIR = "classifier"
METRICS_FILE = "metrics.json"
OUTPUTS = (CLASSIFIER_DIR, METRICS_FILE)  # what a job writes in its folder
HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "classifier.json"
FORMAT = 1

def pool(hidden: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """[B, T, d] right-padded hidden states and each row's real length (BOS included) -> [B, d]."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    pos = torch.arange(hidden.shape[1], device=hidden.device)
    real = ((pos[None, :] >= 1) & (pos[None, :] < lengths[:, None])).unsqueeze(-1).to(hidden.dtype)
    return (hidden * real).sum(1) / real.sum(1).clamp(min=1.0)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists as one right-padded [B, T] batch and their lengths [B] (what `pool` reads)."""
    lengths = torch.tensor([len(x) for x in seqs])
    batch = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, x in enumerate(seqs):
        batch[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    return batch, lengths


@torch.no_grad()
def extract_features(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str], pooling: str = "mean",
                     batch_size: int = 32) -> tuple[Tensor, dict[str, Any]]:  # fmt: skip
    """[len(texts), d_model] fp32 features on the CPU, and {tokens, truncated_texts, seconds, tokens_per_s} (the
    seconds include tokenizing).

    Texts of similar length share a batch, so little padding is computed."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; choose one of {list(POOLINGS)}")
    start_time = time.perf_counter()
    max_len = model.args.max_seq_len
    ids = [[tokenizer.doc_start_id, *t] for t in tokenizer.encode_batch(list(texts))]
    truncated = sum(len(x) > max_len for x in ids)
    if truncated:
        log.warning("%d of %d texts are longer than max_seq_len=%d tokens: each keeps only its first %d",
                    truncated, len(ids), max_len, max_len)  # fmt: skip
    ids = [x[:max_len] for x in ids]
    device = next(model.parameters()).device
    out = torch.empty(len(ids), model.args.d_model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch, lengths = right_pad([ids[i] for i in chunk], tokenizer.pad_id)
            hidden = model(batch.to(device), return_hidden=True).float()
            out[chunk] = pool(hidden, lengths.to(device), pooling).cpu()
    seconds = time.perf_counter() - start_time
    tokens = sum(len(x) for x in ids)
    return out, {"tokens": tokens, "truncated_texts": truncated, "seconds": seconds,
                 "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}  # fmt: skip


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """A head step is microseconds of work: on a CPU, handing it between threads costs more than it saves (on a busy
    2-core machine two threads made each step ~20x slower), so the head trains on one; the setting is restored."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_head(features: Tensor, targets: Tensor, n_classes: int, *, epochs: int, lr: float, batch_size: int,
               seed: int = 0, class_weighting: bool = False,
               weight_decay: float = 0.01) -> tuple[nn.Linear, float]:  # fmt: skip
    """A Linear(d_model, n_classes) trained on cached features (see the module docstring); and the mean training
    loss of the last epoch. Full-batch when batch_size >= len(features)."""
    mean, std = features.mean(0), features.std(0, unbiased=False).clamp(min=1e-6)
    z = (features - mean) / std
    head = nn.Linear(features.shape[1], n_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    weight = None
    if class_weighting:
        counts = torch.bincount(targets, minlength=n_classes).float().clamp(min=1.0)
        weight = len(targets) / (n_classes * counts)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    last_loss = float("nan")
    with _one_cpu_thread(features.device):
        for _ in range(epochs):
            perm = torch.randperm(len(z), generator=gen).to(z.device)
            total = 0.0
            for start in range(0, len(z), batch_size):
                rows = perm[start : start + batch_size]
                loss = F.cross_entropy(head(z[rows]), targets[rows], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
            last_loss = total / len(z)
    # W z + b with z = (x - mean) / std is (W / std) x + (b - (W / std) mean): the same head on raw features.
    folded = nn.Linear(features.shape[1], n_classes).to(features.device)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - folded.weight @ mean)
    return folded, last_loss


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[Label],
                           majority: int) -> dict[str, Any]:  # fmt: skip
    """Accuracy (Wilson 95% interval), the accuracy of always answering class `majority`, per-class precision /
    recall / F1 and their macro-F1 (over the classes present in y_true or y_pred; an undefined ratio counts 0)."""
    n = len(y_true)
    per_class = []
    for c, label in enumerate(labels):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"label": label, "precision": precision, "recall": recall, "f1": f1, "support": tp + fn,
                          "predicted": tp + fp})  # fmt: skip
    present = [m["f1"] for m in per_class if m["support"] or m["predicted"]]
    return {
        "accuracy": proportion(sum(t == p for t, p in zip(y_true, y_pred)), n),
        "majority_baseline": {"label": labels[majority], "accuracy": proportion(sum(t == majority for t in y_true), n)},
        "macro_f1": sum(present) / len(present) if present else 0.0,
        "per_class": per_class,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _predict(head: nn.Linear, features: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(head(features.to(head.weight.device)).float(), dim=-1).cpu()


def train_classifier(
    checkpoint: Path,
    data: Path,
    out_dir: Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    pooling: str = "mean",
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    class_weighting: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train a classification head on the frozen backbone at `checkpoint` with the labelled records of `data`;
    write `out_dir/classifier/` and `out_dir/metrics.json`; return the metrics. `batch_size` is the number of texts
    per backbone forward pass and per head step."""
    t0 = time.perf_counter()
    checkpoint, out_dir = require_checkpoint(checkpoint), Path(out_dir)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; choose one of {list(POOLINGS)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    data_set = read_labelled(data, text_field, label_field, limit)
    labels = label_vocab(data_set.labels)
    if len(labels) < 2:
        raise ValueError(f"{data}: every usable record has the label {labels[0]!r}; a classifier needs two or more")
    index = {label: i for i, label in enumerate(labels)}
    y = torch.tensor([index[label] for label in data_set.labels])
    train_idx, val_idx = stratified_split(data_set.labels, val_fraction, seed)
    settings = {"text_field": text_field, "label_field": label_field, "pooling": pooling, "epochs": epochs, "lr": lr,
                "batch_size": batch_size, "val_fraction": val_fraction, "seed": seed, "limit": limit,
                "class_weighting": class_weighting}  # fmt: skip
    inputs = {"checkpoint": inputs_fingerprint(checkpoint), "data": inputs_fingerprint(data)}
    start_job(out_dir, "sft --task classify", settings, inputs, OUTPUTS)

    model, args = load_model(checkpoint, device, dtype=torch.float32)
    model.requires_grad_(False)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    features, fstats = extract_features(model, tokenizer, data_set.texts, pooling, batch_size)

    t_head = time.perf_counter()
    x_train, y_train = features[train_idx].to(device), y[train_idx].to(device)
    head, final_loss = train_head(x_train, y_train, len(labels), epochs=epochs, lr=lr, batch_size=batch_size,
                                  seed=seed, class_weighting=class_weighting)  # fmt: skip
    head_seconds = time.perf_counter() - t_head
    train_pred = _predict(head, x_train).argmax(-1)
    val_pred = _predict(head, features[val_idx]).argmax(-1).tolist()
    majority = int(torch.bincount(y[train_idx], minlength=len(labels)).argmax())  # a tie goes to the first label

    skipped = data_set.skipped
    metrics = {
        **classification_metrics(y[val_idx].tolist(), val_pred, labels, majority),
        "train_accuracy": float((train_pred == y_train.cpu()).float().mean()), "final_train_loss": final_loss,
        "labels": labels, "n_train": len(train_idx), "n_val": len(val_idx),
        "pooling": pooling, "epochs": epochs, "lr": lr, "batch_size": batch_size, "class_weighting": class_weighting,
        "seed": seed, "text_field": data_set.text_field, "label_field": data_set.label_field,
        "skipped_records": skipped.count, "skipped_by_reason": skipped.by_reason, "skipped_examples": skipped.examples,
        "feature_tokens": fstats["tokens"], "feature_tokens_per_s": fstats["tokens_per_s"],
        "feature_seconds": fstats["seconds"], "truncated_texts": fstats["truncated_texts"],
        "head_seconds": head_seconds,
    }  # fmt: skip
    metrics["seconds"] = time.perf_counter() - t0
    meta = {"format": FORMAT, "labels": labels, "pooling": pooling, "d_model": args.d_model,
            "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": _sha256(checkpoint / WEIGHTS),
            "text_field": data_set.text_field, "label_field": data_set.label_field, "metrics": metrics}  # fmt: skip
    with staged_dir(out_dir / CLASSIFIER_DIR) as tmp:
        st_save_model(head.cpu(), str(tmp / HEAD_WEIGHTS), metadata={"format": "pt"})
        (tmp / HEAD_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    acc, base = metrics["accuracy"], metrics["majority_baseline"]["accuracy"]
    log.info("held-out accuracy %.3f [%.3f, %.3f] on %d (majority baseline %.3f), macro-F1 %.3f, %.1f s",
             acc["value"], *acc["ci95"], acc["n"], base["value"], metrics["macro_f1"], metrics["seconds"])  # fmt: skip
    return metrics


@dataclass
class Classifier:
    """A frozen backbone and its trained head; `predict` gives labels and class probabilities."""

    model: Transformer
    tokenizer: Tokenizer
    head: nn.Linear
    labels: list[Label]
    pooling: str
    meta: dict[str, Any]

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> tuple[list[Label], Tensor]:
        """(the most probable label of each text, probabilities [len(texts), n_classes] in `labels` order)."""
        features, _ = extract_features(self.model, self.tokenizer, texts, self.pooling, batch_size)
        probs = _predict(self.head, features)
        return [self.labels[i] for i in probs.argmax(-1).tolist()], probs


def load_classifier(directory: Path, checkpoint: Path | None = None, device: str = "cpu") -> Classifier:
    """Rebuild a classifier from `directory` (an `out_dir/classifier/`). The backbone is the checkpoint recorded at
    training time unless `checkpoint` is given; either way its weights must be the ones the head was trained on."""
    directory = Path(directory)
    meta_path = directory / HEAD_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a classifier directory: missing {HEAD_META}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this lmforge reads format {FORMAT}")
    backbone = Path(checkpoint) if checkpoint is not None else Path(meta["checkpoint"])
    if not (backbone / WEIGHTS).is_file():
        raise FileNotFoundError(f"backbone checkpoint {backbone} (recorded in {meta_path}) has no {WEIGHTS}; "
                                "pass checkpoint= to point at it")  # fmt: skip
    if _sha256(backbone / WEIGHTS) != meta["checkpoint_sha256"]:
        raise ValueError(f"{backbone} is not the backbone this head was trained on (weights sha256 differs from "
                         f"{meta['checkpoint_sha256'][:12]}... recorded in {meta_path})")  # fmt: skip
    model, args = load_model(backbone, device, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    labels = meta["labels"]
    head = nn.Linear(args.d_model, len(labels)).to(device)
    st_load_model(head, str(directory / HEAD_WEIGHTS), strict=True, device=device)
    head.requires_grad_(False)
    return Classifier(model, load_checkpoint_tokenizer(backbone), head, labels, meta["pooling"], meta)
