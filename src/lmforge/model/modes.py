"""Evaluation mode for a while: scoring, generation and feature extraction switch a model to eval mode (dropout
off) and must hand it back in the mode it had, since the caller may be in the middle of training it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block, then back in its earlier mode, even when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
