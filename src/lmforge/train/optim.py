"""AdamW with decoupled weight decay on matrices only, and a learning-rate schedule that is a pure function of step.

Weight decay goes on every parameter with two or more dimensions, embeddings included: with tied embeddings
the same matrix is the output projection, which is decayed in every setup, and decaying the untied table too
keeps both cases the same optimisation problem. Norm gains and biases (one-dimensional) are not decayed,
since pulling a gain towards zero shrinks the activations it scales rather than regularising anything.

The fused AdamW kernel is used on CPU as well as CUDA: on a 2-core CPU with a 7M-parameter model one step
takes 5 ms fused against 25 ms for foreach and 31 ms for the per-parameter loop (torch 2.13).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.recipe import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and undecayed vectors (norm gains, biases); frozen params left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, on the device they live on."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    device_type = next(model.parameters()).device.type
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(
        groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused, foreach=None if fused else True
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that follows `step` completed updates.

    Linear warmup over `warmup_steps` updates (the first update uses lr / warmup_steps), then cosine or linear
    decay that reaches `lr * min_lr_ratio` at `max_steps`, or a constant `lr`.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = cfg.max_steps - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / span) if span > 0 else 1.0
    if cfg.schedule == "cosine":
        return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr - (cfg.lr - min_lr) * progress
