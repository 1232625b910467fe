"""What a training run tells its user while it runs: a progress bar on a terminal, progress lines with the recent
throughput, elapsed time and an ETA, and a Ctrl-C that stops at the end of a step so a checkpoint can be saved.

Throughput and the ETA come from training time only: the loop times each optimizer step itself and hands the
duration here, so evaluation and checkpoint writing never make a step look slow.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from lmforge.train.flops import mfu

logger = logging.getLogger(__name__)

RECENT_STEPS = 20  # steps the throughput and ETA average over: smooths the noise of one step, follows changes
SHOWN_METRICS = 3  # a loss's metrics shown on the progress line (all of them are in metrics.jsonl)
QUIET_S = 10.0  # a progress line at least this often, even between the regular every-5% lines (logs to a file)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training at a step boundary, after a checkpoint of that step was saved."""


def duration(seconds: float) -> str:
    """`seconds` as H:MM:SS, or M:SS under an hour."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Pace:
    """The durations and tokens of the most recent training steps.

    The first step a process runs includes compilation and allocator warm-up, so it stands in only until a later
    step is known; otherwise it would inflate the ETA for the next RECENT_STEPS steps.
    """

    def __init__(self, window: int = RECENT_STEPS) -> None:
        self._first: tuple[float, int] | None = None
        self._recent: deque[tuple[float, int]] = deque(maxlen=window)

    def add(self, seconds: float, tokens: int) -> None:
        if self._first is None:
            self._first = (seconds, tokens)
        else:
            self._recent.append((seconds, tokens))

    def _steps(self) -> list[tuple[float, int]]:
        return list(self._recent) if self._recent else [self._first] if self._first else []

    def tokens_per_s(self) -> float:
        steps = self._steps()
        seconds = sum(s for s, _ in steps)
        return sum(t for _, t in steps) / seconds if seconds > 0 else 0.0

    def eta(self, steps_left: int) -> float:
        """Seconds the remaining steps will train, at the recent mean step time (evaluations not included)."""
        steps = self._steps()
        return steps_left * sum(s for s, _ in steps) / len(steps) if steps else 0.0


class Heartbeat:
    """Says a long loop is still working: `beat()` logs its message when QUIET_S seconds have passed since the
    last one (or since the start), so a log never goes silent for long on a phase without a progress line."""

    def __init__(self, log: logging.Logger, start: float | None = None) -> None:
        self.log = log
        self._last = time.perf_counter() if start is None else start  # the quiet time counts from here

    def due(self, anyway: bool = False) -> bool:
        """Whether a line is owed now: QUIET_S seconds without one, or `anyway` (a regular line); it restarts the
        quiet time when it says yes."""
        now = time.perf_counter()
        if anyway or now - self._last >= QUIET_S:
            self._last = now
            return True
        return False

    def beat(self, message: Callable[[], str]) -> None:
        if self.due():
            self.log.info("%s", message())


class TrainingProgress:
    """The progress display of one `train` call: a rich bar on an interactive terminal (rank 0 only), and every
    `max_steps // 20` steps, or after QUIET_S seconds without one, a progress line (the logger's, so it reaches
    files and pipes too).

    `clock_start` is the perf_counter() reading at which training would have started had it all run in this
    process (earlier runs' seconds subtracted), for the elapsed time. `peak` and `flops_per_token` turn
    throughput into MFU; `compiled` says the first step includes torch.compile's compilation.
    """

    def __init__(self, max_steps: int, start_step: int, clock_start: float, *, peak: float | None = None,
                 flops_per_token: float | None = None, compiled: bool = False, bar: bool = True) -> None:  # fmt: skip
        self.max_steps, self.start_step, self.clock_start = max_steps, start_step, clock_start
        self.peak, self.flops_per_token, self.compiled = peak, flops_per_token, compiled
        self.log_every = max(1, max_steps // 20)
        self.pace = Pace()
        self._quiet = Heartbeat(logger, start=clock_start)
        console = Console(stderr=True)
        columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
        # The text carries our ETA: rich's own would come from wall time, evaluations included.
        self._bar = Progress(*columns, console=console, disable=not (bar and console.is_terminal))
        self._task = self._bar.add_task("train", total=max_steps, completed=start_step, info="")

    def __enter__(self) -> TrainingProgress:
        if self.compiled and self.start_step < self.max_steps:
            logger.info("compiling the model with torch.compile: the first step takes longer (up to a minute or two "
                        "on a CPU, less when torch's compile cache is warm)...")  # fmt: skip
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def step_done(self, step: int, seconds: float, tokens: int, loss: float, lr: float,
                  metrics: dict[str, float | None] | None = None) -> None:  # fmt: skip
        """Step `step` (1-based) trained `tokens` in `seconds`, evaluation and checkpoint time not included; the
        first SHOWN_METRICS of the loss's `metrics` follow the loss."""
        self.pace.add(seconds, tokens)
        if step == self.start_step + 1 and self.compiled:
            logger.info("step %d took %.1f s, compilation included", step, seconds)
        tokens_per_s = self.pace.tokens_per_s()
        info = f"loss {loss:.4f}{_compact(metrics or {})}  {tokens_per_s:,.0f} tok/s"
        if self.peak and self.flops_per_token:
            info += f"  MFU {mfu(tokens_per_s, self.flops_per_token, self.peak):.1%}"
        eta = f"ETA {duration(self.pace.eta(self.max_steps - step))}"
        self._bar.update(self._task, completed=step, info=f"{info}  {eta}")
        if self._quiet.due(anyway=step % self.log_every == 0 or step == self.max_steps):
            elapsed = duration(time.perf_counter() - self.clock_start)
            logger.info("step %d/%d: %s  lr %.3g  elapsed %s  %s", step, self.max_steps, info, lr, elapsed, eta)

    def callback(self, step: int, name: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
        """An evaluation callback's `run()`, then its metrics and duration."""
        t0 = time.perf_counter()
        found = run()
        logger.info("step %d: %s:%s (%.1f s)", step, name, _compact(found, limit=None) or " no metrics",
                    time.perf_counter() - t0)  # fmt: skip
        return found

    def evaluate(self, step: int, batches: int | None, validate: Callable[[], float]) -> float:
        """`validate()`, announced (with its number of `batches` when known), then its loss and duration."""
        what = f"{batches} validation batches" if batches else "the validation set"
        logger.info("step %d/%d: evaluating on %s...", step, self.max_steps, what)
        t0 = time.perf_counter()
        loss = validate()
        logger.info("step %d: val_loss %.4f (%.1f s)", step, loss, time.perf_counter() - t0)
        return loss


def _compact(metrics: dict[str, float | None], limit: int | None = SHOWN_METRICS) -> str:
    """`  name 0.1234` for the first `limit` metrics (all with None), 4 significant digits each."""
    shown = list(metrics.items())[:limit]
    return "".join(f"  {name} {'n/a' if value is None else format(value, '.4g')}" for name, value in shown)


class StopRequest:
    """Whether Ctrl-C asked the run to stop; the loop reads `requested` at each step boundary."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def stop_at_step_boundary(enabled: bool) -> Iterator[StopRequest]:
    """Turn the first Ctrl-C (SIGINT) into a request to stop after the current step, and give the second one back
    its usual KeyboardInterrupt, so a user who cannot wait for the step to end still stops at once.

    A step interrupted half-way would leave the loader and the random generators past the last finished step,
    and a checkpoint taken then would not resume bit for bit; at the boundary it does. The handler only sets a
    flag: writing to a stream from a signal handler can collide with a write the main thread is making.
    Signal handlers belong to the main thread, and under torchrun each rank would stop at a different step, so
    there (`enabled` false) Ctrl-C keeps its usual meaning; so it does where SIGINT is ignored.
    """
    request = StopRequest()
    in_main = threading.current_thread() is threading.main_thread()
    if not (enabled and in_main) or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield request
        return

    def on_sigint(signum: int, frame: Any) -> None:
        request.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield request
    finally:
        # None: a handler not installed from Python; the interpreter's own is the closest to put back.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
