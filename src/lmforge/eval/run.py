"""The eval stage: held-out loss and bits per byte of a checkpoint, the xz reference, and sample generations."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lmforge.data.io import atomic_write_json, atomic_write_text
from lmforge.data.readers import read_documents
from lmforge.eval.perplexity import XzMeter, score_texts
from lmforge.infer.engine import generate
from lmforge.model.io import load_checkpoint_tokenizer, load_model
from lmforge.recipe import EvalConfig
from lmforge.train.host import keep_freed_memory
from lmforge.train.precision import resolve_device

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".py", ".md", ".jsonl", ".parquet")


def evaluate_checkpoint(
    checkpoint_dir: Path,
    text_source: Path,
    cfg: EvalConfig,
    out_dir: Path,
    *,
    device: str = "auto",
    text_field: str = "text",
) -> dict:
    """Score `text_source` (any file or directory the readers accept) with the checkpoint; write results.json.

    Metrics: val_loss (nats/token), val_bpb, xz_bpb (what `xz -9e` achieves on the same documents, each on its
    own, as the model scores them), xz_concat_bpb (all documents as one xz stream) and bpb_vs_xz.
    """
    keep_freed_memory()
    dev = resolve_device(device)
    model, args = load_model(checkpoint_dir, device=str(dev))
    tokenizer = load_checkpoint_tokenizer(checkpoint_dir)
    texts = (d.text for d in read_documents(text_source, text_field=text_field, extensions=TEXT_EXTENSIONS))
    xz = XzMeter() if cfg.xz_reference else None

    t0 = time.perf_counter()
    score = score_texts(
        model, tokenizer, texts, seq_len=args.max_seq_len, batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens, device=dev, sink=xz,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if score.tokens == 0:
        raise ValueError(f"no text to evaluate in {text_source}")
    metrics = {
        "val_loss": score.loss,
        "val_bpb": score.bpb,
        "val_tokens": score.tokens,
        "val_bytes": score.bytes,
        "val_docs": score.docs,
        "eval_tokens_per_s": score.tokens / seconds,
    }
    if xz is not None:
        metrics.update(xz_bpb=xz.bpb, xz_concat_bpb=xz.concat_bpb, bpb_vs_xz=score.bpb / xz.bpb)
    log.info(
        "held-out: loss %.4f nats/token, %.4f bits/byte%s over %d tokens (%d bytes)",
        score.loss, score.bpb, f" (xz -9e per file {xz.bpb:.4f}, concatenated {xz.concat_bpb:.4f})" if xz else "",
        score.tokens, score.bytes,
    )  # fmt: skip

    samples = sample_generations(model, tokenizer, cfg, dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", {"metrics": metrics, "samples": samples})
    atomic_write_text(out_dir / "samples.md", _samples_markdown(samples))
    return metrics


def sample_generations(model, tokenizer, cfg: EvalConfig, device: torch.device) -> list[dict]:
    """`cfg.samples` generations, cycling through the prompts, reproducible (seeded by index)."""
    out = []
    for i in range(cfg.samples):
        prompt = cfg.prompts[i % len(cfg.prompts)] if cfg.prompts else ""
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        new = generate(
            model, [ids], cfg.sample_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
            eos_id=tokenizer.eos_id, seed=i,
        )[0]  # fmt: skip
        out.append({"prompt": prompt, "completion": tokenizer.decode(new)})
    return out


def _samples_markdown(samples: list[dict]) -> str:
    parts = ["# Sample generations\n"]
    for i, s in enumerate(samples, 1):
        parts.append(f"## Sample {i}: prompt `{s['prompt']!r}`\n\n```python\n{s['prompt']}{s['completion']}\n```\n")
    return "\n".join(parts)
