"""Activation checkpointing applied to an unmodified model from outside.

`apply_activation_checkpointing(model, every)` makes every k-th transformer block (blocks 0, k, 2k, ...) recompute
its activations in the backward pass instead of storing them (`torch.utils.checkpoint`, non-reentrant). Only the
blocks' `forward` is replaced, on the instances: the module tree, parameter names and `state_dict` keys stay exactly
as they were, so checkpoints, optimizer state and export are unaffected.

A wrapped block runs its plain forward when gradients are off or when a KV cache is passed, so inference (and the
cache, which must not be written twice by a recomputation) behaves as without checkpointing.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.model.transformer import Block

_FLAG = "_lmforge_activation_checkpointing"


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    plain = type(self).forward
    if not torch.is_grad_enabled() or kwargs.get("cache") is not None:
        return plain(self, *args, **kwargs)
    return checkpoint(plain, self, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, every: int) -> int:
    """Checkpoint every `every`-th block of `model` (0: none, 1: all); returns the number of blocks wrapped.

    Blocks are found as `Block` submodules, so a model already wrapped (DDP's `.module`, LoRA) works too. Bound as
    a method of each block, so `copy.deepcopy(model)` gives a copy whose blocks checkpoint themselves.
    """
    if every < 0:
        raise ValueError(f"activation_checkpointing must be >= 0 (0 none, 1 every block, k every k-th), got {every}")
    if every == 0:
        return 0
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if any(getattr(b, _FLAG, False) for b in blocks):
        raise ValueError("activation checkpointing is already applied to this model")
    wrapped = 0
    for i, block in enumerate(blocks):
        if i % every:
            continue
        block.forward = types.MethodType(_checkpointed_forward, block)  # type: ignore[method-assign]
        setattr(block, _FLAG, True)
        wrapped += 1
    return wrapped
