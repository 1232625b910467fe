"""The pretrain stage: a fresh transformer, the token shards, the causal-LM loss, fed to the one training loop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lmforge.data.loader import BatchLoader
from lmforge.data.shards import open_split
from lmforge.model.io import write_model_files
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import clm_loss
from lmforge.recipe import ModelConfig, TrainConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import train

log = logging.getLogger(__name__)


def validation_windows(split, seq_len: int, n_windows: int, bos_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of held-out windows spread evenly over the split, so every validation reads the same tokens.

    Targets that are BOS (the start of the next document) are ignored: no text stands behind them.
    """
    available = (split.n_tokens - 1) // seq_len
    if available < 1:
        raise ValueError(f"validation split has {split.n_tokens} tokens, fewer than seq_len+1={seq_len + 1}")
    starts = np.linspace(0, (available - 1) * seq_len, num=min(n_windows, available)).astype(np.int64)
    windows = []
    for s in starts:
        chunk = torch.from_numpy(split.slice(int(s), int(s) + seq_len + 1))
        x, y = chunk[:-1].clone(), chunk[1:].clone()
        y[y == bos_id] = -100
        windows.append((x, y))
    return windows


def make_val_fn(windows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """Mean held-out loss (nats per token) over fixed windows."""

    @torch.no_grad()
    def val_fn(model: torch.nn.Module) -> float:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(windows), batch_size):
            xs = torch.stack([w[0] for w in windows[i : i + batch_size]]).to(device)
            ys = torch.stack([w[1] for w in windows[i : i + batch_size]]).to(device)
            n = int((ys != -100).sum())
            total += float(clm_loss(model, (xs, ys))) * n
            count += n
        model.train(was_training)
        return total / max(count, 1)

    return val_fn


def pretrain(
    shards_dir: Path,
    tokenizer_path: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
) -> dict:
    """Train a causal LM from scratch on `shards_dir`; the final model lands in `out_dir/final/`.

    Re-running on the same `out_dir` resumes from its last checkpoint.
    """
    tokenizer = Tokenizer.from_file(tokenizer_path)
    args = ModelArgs.from_config(model_cfg, tokenizer.vocab_size)
    torch.manual_seed(train_cfg.seed)
    model = Transformer(args)
    model.init_weights()
    log.info(
        "model: %d layers, d_model %d, %d heads (%d kv), %.2fM parameters (%.2fM non-embedding)",
        args.n_layers, args.d_model, args.n_heads, args.n_kv_heads,
        model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6,
    )  # fmt: skip

    train_split = open_split(shards_dir, "train")
    val_split = open_split(shards_dir, "val")
    loader = BatchLoader(train_split, train_cfg.seq_len, train_cfg.batch_size, train_cfg.seed)
    windows = validation_windows(val_split, train_cfg.seq_len, train_cfg.eval_batches * train_cfg.batch_size,
                                 tokenizer.bos_id)  # fmt: skip

    metrics = train(
        model,
        clm_loss,
        loader,
        train_cfg,
        out_dir,
        flops_per_token=model.flops_per_token(train_cfg.seq_len),
        tokens_per_batch=train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum,
        val_fn=make_val_fn(windows, train_cfg.batch_size),
        write_model_files=lambda m, d: write_model_files(m, args, d, tokenizer_path),
    )
    metrics.update(
        params=model.num_params(),
        non_embedding_params=model.num_params(non_embedding=True),
        flops_per_token=model.flops_per_token(train_cfg.seq_len),
        train_tokens_available=train_split.n_tokens,
        epochs=metrics.get("tokens", 0) / max(train_split.n_tokens, 1),
    )
    return metrics
