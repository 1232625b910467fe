"""Objectives: a model and a batch in, a loss out. Targets equal to IGNORE_INDEX do not count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def clm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Causal LM loss: mean cross entropy over target tokens, computed in fp32 whatever the model's dtype."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)


def token_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, [B, T], 0 where y is IGNORE_INDEX."""
    logits = model(x)
    return F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")
