"""The one training loop: a model, an endless stream of batches and a loss function, for every training stage.

Pre-training, SFT, reward models and distillation differ only in the loss function and the batches they pass
in. Device placement, autocast and `torch.compile` are applied here, from outside the model. A run directory is
self-resuming: calling `train` again on the same `out_dir` continues from the newest checkpoint and, on CPU,
ends with weights bit-identical to an uninterrupted run.

    out_dir/metrics.jsonl   one JSON record per optimizer step (truncated back to the checkpoint on resume)
    out_dir/checkpoints/    training checkpoints (see train.checkpoint)
    out_dir/final/          the final model files

Under torchrun the same call trains on every rank (lmforge.train.distributed): the model is wrapped for data,
fully sharded or pipeline parallelism from outside, losses are averaged over the ranks, only rank 0 writes
metrics, logs progress and writes the model files, and checkpoints are distributed ones that load at any world
size (lmforge.train.dist_checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.device import available_cores, set_threads
from lmforge.io import atomic_write_text
from lmforge.io import staged_dir
from lmforge.model.modes import evaluating
from lmforge.recipe import ParallelConfig, TrainConfig
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    ModelWriter,
    TrainerState,
    list_checkpoints,
    load_latest_training_checkpoint,
    save_training_checkpoint,
    write_model,
)
from lmforge.train.dist_checkpoint import (
    DCP_DIR,
    add_distributed_copy,
    is_distributed_checkpoint,
    load_distributed_checkpoint,
    load_full_model,
    model_skeleton,
    save_distributed_checkpoint,
)
from lmforge.train.distributed import Parallelized, World, collective_errors, init_world, parallelize
from lmforge.train.flops import measure_peak_flops, mfu
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.host import keep_freed_memory
from lmforge.train.progress import TrainingInterrupted, TrainingProgress, stop_at_step_boundary
from lmforge.train.precision import autocast_context, compute_dtype, grad_scaler, use_compile

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
OUTPUTS = (CHECKPOINTS, FINAL_DIR, METRICS_FILE)  # everything train() writes in out_dir
GUARD_WARMUP = 10  # good steps before the spike check starts; the first losses fall too fast to compare against
GUARD_EMA = 0.9  # weight of the past in the running mean loss
STEADY_AFTER = 3  # steps per process excluded from throughput (allocator warm-up, compilation)

LossFn = Callable[[nn.Module, Any], Tensor]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite or exploding loss; no update was applied for any of them."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _open_metrics(path: Path, through_step: int) -> TextIO:
    """Keep the records of steps 1..through_step (the resumed checkpoint) and open the file for appending."""
    kept: list[str] = []
    if through_step > 0 and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            if record.get("step", 0) <= through_step:
                kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
    # Line-buffered: every record reaches the OS as it is written, so a kill loses none before a checkpoint.
    return open(path, "a", encoding="utf-8", buffering=1)


def _bad_step_reason(loss: float, grad_norm: float, state: TrainerState, spike_factor: float) -> str | None:
    if not math.isfinite(loss):
        return f"non-finite loss {loss}"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm {grad_norm}"
    if state.good_steps >= GUARD_WARMUP and state.loss_mean is not None and loss > spike_factor * state.loss_mean:
        return f"loss {loss:.4g} > {spike_factor:g} x running mean {state.loss_mean:.4g}"
    return None


def _forward_backward(
    par: Parallelized,
    forward_model: nn.Module,
    loss_fn: LossFn,
    loader: Any,
    autocast: Any,
    cfg: TrainConfig,
    tokens_per_batch: int | None,
    scaler: torch.amp.GradScaler | None = None,
    optimizer: Any = None,
) -> tuple[Tensor, Tensor, int]:
    """Accumulate gradients over `cfg.grad_accum` micro-batches, then clip; returns (mean loss, norm, tokens).

    With an fp16 `scaler`, the backward pass runs on the scaled loss and the gradients are unscaled before
    clipping, so the norm and the clip threshold are in true units. Under several ranks the loss is the mean over
    the data-parallel ranks and the norm is that of the whole model's gradient.
    """
    device = par.world.device
    loss_sum = torch.zeros((), device=device)
    tokens = tokens_per_batch or 0
    for i in range(cfg.grad_accum):
        batch = next(loader)
        if tokens_per_batch is None:
            tokens += _count_tokens(batch) * par.world.dp_size
        if par.pipeline is not None:
            loss_sum += par.pipeline.step(batch, cfg.grad_accum)
            continue
        batch = _to_device(batch, device)
        with par.accumulation(last=i == cfg.grad_accum - 1):
            with autocast:
                loss = loss_fn(forward_model, batch)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
    par.sync_pipeline_grads()
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf still measures the norm, and scales by 1.0
    grad_norm = par.clip_grad_norm(clip)
    return par.mean_loss(loss_sum / cfg.grad_accum), grad_norm, tokens


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


def _evaluate(model: nn.Module, val_fn: Callable[[nn.Module], float], autocast: Any) -> float:
    with evaluating(model), torch.no_grad(), autocast:
        return float(val_fn(model))


def _write_final(model: nn.Module, out_dir: Path, write_model_files: ModelWriter | None) -> Path:
    dest = out_dir / FINAL_DIR
    with staged_dir(dest) as tmp:
        write_model(model, tmp, write_model_files)
    return dest


def _cpu_threads(cfg: TrainConfig, world: World) -> int:
    """train.threads, or the cores this process may use shared among the ranks on this machine."""
    if cfg.threads or not world.distributed:
        return cfg.threads
    return max(1, available_cores() // world.local_world_size)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Any,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    flops_per_token: float | None = None,
    tokens_per_batch: int | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    write_model_files: ModelWriter | None = None,
    parallel: ParallelConfig | None = None,
    pipeline_io: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
    val_batches: int | None = None,
) -> dict:
    """Train `model` for `cfg.max_steps` optimizer steps of `cfg.grad_accum` micro-batches from `loader`.

    `loss_fn(model, batch)` returns the mean loss of one micro-batch. `loader` is any endless iterator with
    `state_dict()` / `load_state_dict()`; under several ranks it yields this rank's share of each global batch.
    `tokens_per_batch` is the tokens one optimizer step consumes over all ranks (all micro-batches together);
    when omitted it is counted from the first tensor of each batch. `flops_per_token` (training FLOPs, forward
    and backward) turns throughput into MFU. `val_fn(model)` returns a held-out loss (over `val_batches` batches,
    which the progress log names). `write_model_files(model, dir)` writes the model files of checkpoints and of
    `out_dir/final/`; without it only model.safetensors is written. `parallel` says how a torchrun job splits the
    work; `pipeline_io(batch) -> (input_ids, targets)` lets a causal-LM stage run pipeline parallel. Returns the
    run's metrics.

    In a single process, Ctrl-C stops training at the end of the current step, saves a checkpoint of it and raises
    TrainingInterrupted (a KeyboardInterrupt); training again into `out_dir` resumes from it bit for bit.
    """
    out_dir = Path(out_dir)
    parallel = parallel or ParallelConfig()
    world = init_world(parallel, cfg.device)
    device = world.device
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    set_threads(_cpu_threads(cfg, world))
    keep_freed_memory()
    _seed_everything(cfg.seed)
    model.train()
    found = list_checkpoints(out_dir)
    latest = found[-1][1] if found else None
    state: TrainerState | None = None
    skeleton = None
    if world.distributed:
        if latest is not None and not is_distributed_checkpoint(latest):
            # A single-process checkpoint: rank 0 adds a DCP copy of it, which every rank then loads by name.
            with collective_errors("converting the checkpoint", world):
                if world.is_main:
                    plain = build_optimizer(model, cfg)
                    load_latest_training_checkpoint(out_dir, model, plain, loader)
                    add_distributed_copy(latest, model, plain)
                    del plain
                torch.distributed.barrier()
        skeleton = model_skeleton(model, world.is_main)
    model.to(device)
    if cfg.activation_checkpointing:
        from lmforge.train.activation_checkpointing import apply_activation_checkpointing

        wrapped = apply_activation_checkpointing(model, cfg.activation_checkpointing)
        logger.info("activation checkpointing on %d blocks (every %d)", wrapped, cfg.activation_checkpointing)
    par = parallelize(model, world, parallel, cfg, pipeline_io)
    optimizer = build_optimizer(par.state_module, cfg)
    if latest is not None and is_distributed_checkpoint(latest):
        with collective_errors("loading the checkpoint", world):
            state = load_distributed_checkpoint(latest, par.state_module, optimizer, loader)
    elif not world.distributed:
        state = load_latest_training_checkpoint(out_dir, model, optimizer, loader)
    resumed_from = state.step if state else None
    state = state or TrainerState()
    # FSDP's mixed-precision policy casts the weights itself; autocast on top would only add casts.
    autocast = contextlib.nullcontext() if par.fsdp else autocast_context(device, cfg.precision)
    scaler = grad_scaler(device, cfg.precision)
    if scaler is not None and par.pipeline is not None:
        raise ValueError("train.precision=fp16 is not supported with pipeline parallelism; use bf16")
    if scaler is not None and state.loss_scale is not None:
        scaler.load_state_dict({**scaler.state_dict(), "scale": state.loss_scale, "_growth_tracker": state.scale_growth})
    compiled = use_compile(cfg.compile, device) and par.pipeline is None
    if use_compile(cfg.compile, device) and par.pipeline is not None:
        logger.warning("train.compile is not applied to pipeline stages; they run eager")
    forward_model = torch.compile(par.module) if compiled else par.module
    peak = measure_peak_flops(device, compute_dtype(device, cfg.precision)) if flops_per_token else None
    if peak:
        peak *= world.world_size  # every rank measured its own device, under the same load
    start_step, process_start = state.step, time.perf_counter()
    seconds_before = state.train_seconds

    run = _Run(par, forward_model, loss_fn, loader, autocast, cfg, tokens_per_batch, scaler, optimizer, val_fn, peak,
               flops_per_token, start_step, out_dir, val_batches)  # fmt: skip
    progress = TrainingProgress(cfg.max_steps, start_step, process_start - seconds_before, peak=peak,
                                flops_per_token=flops_per_token, compiled=compiled, bar=world.is_main)  # fmt: skip
    metrics_file = _open_metrics(out_dir / METRICS_FILE, state.step) if world.is_main else open(os.devnull, "w")
    with metrics_file, progress, stop_at_step_boundary(not world.distributed) as stop:
        for step in range(state.step, cfg.max_steps):
            with collective_errors(f"training step {step + 1}", world):
                run.step(step, state, metrics_file, progress)
                state.train_seconds = seconds_before + time.perf_counter() - process_start
                # Read once: a Ctrl-C landing between two reads would stop without this step's checkpoint.
                stopping = stop.requested and state.step < cfg.max_steps
                if stopping:
                    logger.warning("Ctrl-C: saving a checkpoint of step %d, then stopping (Ctrl-C again stops at "
                                   "once)", state.step)  # fmt: skip
                if state.step % cfg.ckpt_every == 0 or state.step == cfg.max_steps or stopping:
                    _save_checkpoint(out_dir, state, par, optimizer, loader, cfg, skeleton, write_model_files)
            if stopping:
                raise TrainingInterrupted(
                    f"training stopped by Ctrl-C after step {state.step} of {cfg.max_steps}; checkpoint saved in "
                    f"{list_checkpoints(out_dir)[-1][1]}; training again into {out_dir} resumes from it"
                )

    state.train_seconds = seconds_before + time.perf_counter() - process_start
    final_dir = out_dir / FINAL_DIR
    if not world.distributed:
        _write_final(model, out_dir, write_model_files)
    else:
        with collective_errors("writing the final model", world):
            if world.is_main:
                newest = list_checkpoints(out_dir)[-1][1]
                if is_distributed_checkpoint(newest):
                    load_full_model(skeleton, newest / DCP_DIR)
                _write_final(skeleton, out_dir, write_model_files)
            torch.distributed.barrier()
    logger.info("final model written to %s", final_dir)
    tokens_per_s = state.steady_tokens / state.steady_seconds if state.steady_seconds > 0 else None
    return {
        "steps": state.step,
        "tokens": state.tokens,
        "final_loss": state.last_loss,
        "final_val_loss": state.val_loss,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, flops_per_token, peak) if peak and tokens_per_s else None,
        "peak_flops": peak,
        "train_seconds": state.train_seconds,
        "skipped_steps": state.skipped_steps,
        "resumed_from": resumed_from,
        "world_size": world.world_size,
        "parallel": {"data": parallel.data if world.dp_size > 1 else None, "dp": world.dp_size,
                     "pipeline": world.pp_size},  # fmt: skip
        "compiled": compiled,
    }


def _save_checkpoint(
    out_dir: Path,
    state: TrainerState,
    par: Parallelized,
    optimizer: Any,
    loader: Any,
    cfg: TrainConfig,
    skeleton: nn.Module | None,
    write_model_files: ModelWriter | None,
) -> None:
    if par.world.distributed:
        save_distributed_checkpoint(out_dir, state, par.state_module, optimizer, loader, world=par.world,
                                    skeleton=skeleton, keep_last=cfg.keep_last,
                                    write_model_files=write_model_files)  # fmt: skip
    else:
        save_training_checkpoint(out_dir, state, par.state_module, optimizer, loader, keep_last=cfg.keep_last,
                                 write_model_files=write_model_files)  # fmt: skip


@dataclass
class _Run:
    """What every step of one `train` call uses."""

    par: Parallelized
    forward_model: nn.Module
    loss_fn: LossFn
    loader: Any
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

    def step(self, step: int, state: TrainerState, metrics_file: TextIO, progress: TrainingProgress) -> None:
        """One optimizer step with its guard, record, validation and progress line."""
        t0 = time.perf_counter()
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm, step_tokens = _forward_backward(
            self.par, self.forward_model, self.loss_fn, self.loader, self.autocast, self.cfg, self.tokens_per_batch,
            self.scaler, self.optimizer)  # fmt: skip
        # The step's only host sync: the guard needs the loss before deciding whether to update.
        loss_val, norm_val = torch.stack([loss, grad_norm.float().to(loss.device)]).tolist()
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
        state.step = step + 1
        state.tokens += step_tokens

        dt = time.perf_counter() - t0
        tokens_per_s = step_tokens / dt
        if step - self.start_step >= min(STEADY_AFTER, self.cfg.max_steps - self.start_step - 1):
            state.steady_tokens += step_tokens
            state.steady_seconds += dt
        record: dict[str, Any] = {
            "step": state.step,
            "loss": loss_val if math.isfinite(loss_val) else None,
            "lr": lr,
            "grad_norm": norm_val if math.isfinite(norm_val) else None,
            "tokens": state.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak) if self.peak else None,
        }
        if reason is not None:
            record["skipped"] = reason
        if state.bad_in_row >= self.cfg.max_bad_steps:
            metrics_file.write(json.dumps(record) + "\n")
            _raise_diverged(self.out_dir, state, self.cfg)
        progress.step_done(state.step, dt, step_tokens, loss_val, lr)
        if self.val_fn is not None and (state.step % self.cfg.eval_every == 0 or state.step == self.cfg.max_steps):
            state.val_loss = progress.evaluate(state.step, self.val_batches, lambda: self.par.agree(
                _evaluate(self.par.eval_module, self.val_fn, self.autocast)))  # fmt: skip
            record["val_loss"] = state.val_loss
        metrics_file.write(json.dumps(record) + "\n")


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
