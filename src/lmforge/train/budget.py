"""Training time so far, the clock a time budget (`train.max_time`) and its lr schedule read.

The time is the seconds of earlier processes of the run (saved in every checkpoint as `train_seconds`) plus this
process's, so a resumed run continues the schedule where the checkpoint left it. The clock is a parameter
(`time.perf_counter` by default) so that a test can drive a budget deterministically. Under a budget the ranks of a
distributed job use rank 0's reading (one broadcast per step), so all of them set the same learning rate and stop
after the same step; without one nothing is exchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.train.distributed import World

Clock = Callable[[], float]


class TrainingTime:
    """`elapsed()`: the training seconds of this run so far, agreed by every rank when `agree` (a budget is set)."""

    def __init__(self, clock: Clock, seconds_before: float, world: World, agree: bool) -> None:
        self.clock, self.before, self.world, self.agree = clock, seconds_before, world, agree
        self.start = clock()

    def elapsed(self) -> float:
        seconds = self.before + self.clock() - self.start
        if self.agree and self.world.distributed:
            value = torch.tensor([seconds], dtype=torch.float64, device=self.world.device)
            torch.distributed.broadcast(value, src=0)
            seconds = float(value.item())
        return seconds
