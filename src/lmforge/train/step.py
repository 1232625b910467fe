"""One optimizer step of the training loop: the step's loss tokens, the micro-batches' forward and backward, the
loss and metrics reduced over the ranks, the divergence guard, the update, the record and the evaluations.

The loss contract is lmforge.losses': before any forward, the loop counts the loss tokens of all the step's
micro-batches on all data-parallel ranks (`BatchSource.loss_tokens`, one all_reduce of a number) and passes the
count to the loss, whose return values are shares of the step's loss. Data parallelism averages gradients over
the ranks, so each rank's backward runs on its share times the number of ranks; the step's loss is the sum of all
shares, and each metric the mean over the step's micro-batches and ranks. Loss, metrics and gradient norm reach
the host in one transfer, the step's only sync.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch
from torch import Tensor, nn

from lmforge.data.batches import BatchSource
from lmforge.losses import LossContext, LossFn, Metrics
from lmforge.model.modes import evaluating
from lmforge.train.budget import TrainingTime
from lmforge.train.checkpoint import TrainerState, list_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Parallelized
from lmforge.train.flops import mfu
from lmforge.train.optim import lr_at
from lmforge.train.progress import TrainingProgress

logger = logging.getLogger(__name__)

GUARD_WARMUP = 10  # good steps before the spike check starts; the first losses fall too fast to compare against
GUARD_EMA = 0.9  # weight of the past in the running mean loss
STEADY_AFTER = 3  # steps per process excluded from throughput (allocator warm-up, compilation)
# What the loop itself writes in a step's record: a loss metric or a callback's value may not reuse these names.
RECORD_KEYS = frozenset({"step", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "tokens_per_s", "mfu", "skipped",
                         "val_loss"})  # fmt: skip

Callback = Callable[[nn.Module, int], Mapping[str, float]]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite or exploding loss; no update was applied for any of them."""


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _count_tokens(batch: Any) -> int:
    """Tokens in a batch: the size of its first tensor (the input ids, by convention)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        n = _count_tokens(item)
        if n:
            return n
    return 0


def _add_metrics(sums: dict[str, Tensor], metrics: Metrics, first: bool, device: torch.device) -> None:
    """Add one micro-batch's metrics (scalar tensors or numbers) to the step's sums, on the device."""
    if not first and set(metrics) != set(sums):
        raise ValueError(f"the loss returned the metrics {sorted(metrics)} for one micro-batch and {sorted(sums)} "
                         "for another; a loss must return the same metric names every time")  # fmt: skip
    for name, value in metrics.items():
        v = value.detach().float().reshape(()).to(device) if isinstance(value, Tensor) else \
            torch.full((), float(value), device=device)  # fmt: skip
        sums[name] = sums[name] + v if name in sums else v


def _check_names(names: Sequence[str], what: str) -> None:
    clash = sorted(set(names) & RECORD_KEYS)
    if clash:
        raise ValueError(f"{what} named {clash}, which the training loop writes itself; rename them (the loop's "
                         f"names: {sorted(RECORD_KEYS)})")  # fmt: skip


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _bad_step_reason(loss: float, grad_norm: float, state: TrainerState, spike_factor: float) -> str | None:
    if not math.isfinite(loss):
        return f"non-finite loss {loss}"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm {grad_norm}"
    # A ratio to the running mean judges only losses that stay positive (cross-entropy); an RL surrogate (PPO,
    # GRPO) swings around 0, where any loss would be "many times" its mean.
    if (state.good_steps >= GUARD_WARMUP and state.loss_mean is not None and state.loss_mean > 0
            and loss > spike_factor * state.loss_mean):
        return f"loss {loss:.4g} > {spike_factor:g} x running mean {state.loss_mean:.4g}"
    return None


def _record_good(state: TrainerState, loss: float) -> None:
    state.loss_mean = loss if state.loss_mean is None else GUARD_EMA * state.loss_mean + (1 - GUARD_EMA) * loss
    state.good_steps += 1
    state.last_loss = loss
    state.bad_in_row = 0
    state.bad_losses.clear()


def _record_bad(state: TrainerState, loss: float) -> None:
    state.bad_in_row += 1
    state.skipped_steps += 1
    state.bad_losses.append(loss)


@dataclass
class StepRunner:
    """What every step of one `train` call uses."""

    par: Parallelized
    loss_fn: LossFn
    loader: BatchSource
    autocast: Any
    cfg: TrainConfig
    tokens_per_batch: int | None
    scaler: Any
    optimizer: Any
    val_fn: Callable[[nn.Module], float] | None
    peak: float | None
    flops_per_token: float | None
    start_step: int
    out_dir: Path
    val_batches: int | None
    frozen: Mapping[str, nn.Module]
    callbacks: Sequence[Callback]
    time: TrainingTime

    def forward_backward(self) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], int]:
        """Accumulate the gradients of `cfg.grad_accum` micro-batches, then clip; returns (loss, gradient norm,
        loss tokens, metrics, tokens), the first four on the device, reduced over the ranks.

        With an fp16 `scaler`, the backward pass runs on the scaled loss and the gradients are unscaled before
        clipping, so the norm and the clip threshold are in true units. Under several ranks the norm is that of
        the whole model's gradient.
        """
        par, cfg, device = self.par, self.cfg, self.par.world.device
        batches = [next(self.loader) for _ in range(cfg.grad_accum)]
        local = sum(self.loader.loss_tokens(b) for b in batches)
        ctx = LossContext(par.global_count(local), cfg.grad_accum * par.world.dp_size, self.frozen)
        tokens = self.tokens_per_batch or sum(_count_tokens(b) for b in batches) * par.world.dp_size
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, Tensor] = {}
        for i, batch in enumerate(batches):
            if par.pipeline is not None:
                loss, metrics = par.pipeline.step(batch, ctx)
            else:
                with par.accumulation(last=i == cfg.grad_accum - 1):
                    with self.autocast:
                        loss, metrics = self.loss_fn(par.module, _to_device(batch, device), ctx)
                    # Data parallelism averages the ranks' gradients; the step's loss is the sum of their shares.
                    scaled = loss * par.world.dp_size if par.world.dp_size > 1 else loss
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
            _add_metrics(metric_sums, metrics, i == 0, device)
        par.sync_pipeline_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf still measures the norm, and scales by 1.0
        grad_norm = par.clip_grad_norm(clip)
        loss, metrics = par.reduce_step(loss_sum, metric_sums, ctx.parts)
        return loss, grad_norm, ctx.tokens, metrics, tokens

    def _update(self, step: int, state: TrainerState, loss_val: float, norm_val: float) -> str | None:
        """Apply the step unless the guard refuses it; returns why it was skipped, or None."""
        reason = _bad_step_reason(loss_val, norm_val, state, self.cfg.spike_factor)
        overflow = self.scaler is not None and math.isfinite(loss_val) and not math.isfinite(norm_val)
        if reason is None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            _record_good(state, loss_val)
        elif overflow:
            # fp16 gradients overflowed at this loss scale: the scaler halves it; not a sign of divergence.
            state.skipped_steps += 1
            reason = f"fp16 gradient overflow at loss scale {self.scaler.get_scale():g}"
            logger.info("step %d skipped: %s", step + 1, reason)
        else:
            _record_bad(state, loss_val)
            logger.warning("step %d skipped: %s", step + 1, reason)
        if self.scaler is not None:
            self.scaler.update()
            state.loss_scale = float(self.scaler.get_scale())
            state.scale_growth = int(self.scaler.state_dict()["_growth_tracker"])
        self.optimizer.zero_grad(set_to_none=True)
        return reason

    def out_of_time(self, state: TrainerState) -> bool:
        """Whether the run's time budget (train.max_time) is spent; never without one."""
        return self.cfg.max_time is not None and state.train_seconds >= self.cfg.max_time

    def step(self, step: int, state: TrainerState, metrics_file: TextIO, progress: TrainingProgress) -> bool:
        """One optimizer step with its guard, record, evaluations and progress line; True when it is the last."""
        t0 = time.perf_counter()
        lr = lr_at(step, self.cfg, state.train_seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm, loss_tokens, metrics, step_tokens = self.forward_backward()
        if step == self.start_step:
            _check_names(list(metrics), "the loss returned metrics")
        # The step's only host sync: the guard needs the loss before deciding whether to update.
        values = torch.stack([t.double().to(loss.device) for t in (loss, grad_norm, loss_tokens, *metrics.values())])
        loss_val, norm_val, loss_tokens_val, *metric_vals = values.tolist()
        found = {name: _finite(v) for name, v in zip(metrics, metric_vals)}
        reason = self._update(step, state, loss_val, norm_val)
        state.step = step + 1
        state.tokens += step_tokens
        state.last_metrics = found
        # Read before the evaluations, whose time counts in the next step's reading.
        state.train_seconds = self.time.elapsed()
        last = state.step == self.cfg.max_steps or self.out_of_time(state)

        dt = time.perf_counter() - t0
        tokens_per_s = step_tokens / dt
        if step - self.start_step >= min(STEADY_AFTER, self.cfg.max_steps - self.start_step - 1):
            state.steady_tokens += step_tokens
            state.steady_seconds += dt
        record: dict[str, Any] = {
            "step": state.step,
            "loss": _finite(loss_val),
            "lr": lr,
            "grad_norm": _finite(norm_val),
            "tokens": state.tokens,
            "loss_tokens": int(loss_tokens_val),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak) if self.peak else None,
            **found,
        }
        if reason is not None:
            record["skipped"] = reason
        if state.bad_in_row >= self.cfg.max_bad_steps:
            metrics_file.write(json.dumps(record) + "\n")
            _raise_diverged(self.out_dir, state, self.cfg)
        progress.step_done(state.step, dt, step_tokens, loss_val, lr, found)
        if state.step % self.cfg.eval_every == 0 or last:
            record.update(self._evaluate(state, progress))
        metrics_file.write(json.dumps(record) + "\n")
        return last

    def _evaluate(self, state: TrainerState, progress: TrainingProgress) -> dict[str, float]:
        """The validation loss and the callbacks' metrics at an evaluation step, agreed by every rank."""
        out: dict[str, float] = {}
        par, module = self.par, self.par.eval_module
        if self.val_fn is not None:
            validate = lambda: float(self.val_fn(module))  # noqa: E731
            state.val_loss = progress.evaluate(state.step, self.val_batches,
                                               lambda: par.agree(_in_eval_mode(module, self.autocast, validate)))
            out["val_loss"] = state.val_loss
        for callback in self.callbacks:
            name = getattr(callback, "__name__", type(callback).__name__)
            found = progress.callback(state.step, name, lambda: self._run_callback(callback, state.step))
            state.eval_metrics.update(found)
            out.update(found)
        return out

    def _run_callback(self, callback: Callback, step: int) -> dict[str, float]:
        """A callback's metrics: it runs on every rank (the model may be sharded or pipelined) and the values of
        the rank that holds the whole result are kept (Parallelized.agree)."""
        module = self.par.eval_module
        found = _in_eval_mode(module, self.autocast, lambda: dict(callback(module, step)))
        _check_names(list(found), "an evaluation callback returned metrics")
        return {name: self.par.agree(float(value)) for name, value in found.items()}


def _in_eval_mode(model: nn.Module, autocast: Any, run: Callable[[], Any]) -> Any:
    with evaluating(model), torch.no_grad(), autocast:
        return run()


def _raise_diverged(out_dir: Path, state: TrainerState, cfg: TrainConfig) -> NoReturn:
    checkpoints = list_checkpoints(out_dir)
    last_good = str(checkpoints[-1][1]) if checkpoints else "none written yet"
    shown = ", ".join(f"{v:.4g}" for v in state.bad_losses)
    mean = f"{state.loss_mean:.4g}" if state.loss_mean is not None else "n/a"
    raise TrainingDiverged(
        f"training diverged at step {state.step}: {state.bad_in_row} bad steps in a row "
        f"(max_bad_steps={cfg.max_bad_steps}) with losses [{shown}]; running mean of good losses {mean}, "
        f"spike_factor={cfg.spike_factor:g}. No update was applied for these steps; "
        f"last good checkpoint: {last_good}"
    )
