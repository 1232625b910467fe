"""The one training loop: a model, a batch source and a loss function, for every training stage.

Pre-training, SFT, reward models and distillation differ only in the loss function and the batches they pass
in (the contract: lmforge.losses, lmforge.data.batches; one step: lmforge.train.step). Device placement and
autocast are applied here, parallelism, activation checkpointing and `torch.compile` by
lmforge.train.distributed.parallelize, all from outside the model. A run directory is self-resuming: calling
`train` again on the same `out_dir` continues from the newest checkpoint and, on CPU, ends with weights
bit-identical to an uninterrupted run.

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
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
import contextlib
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from lmforge.device import available_cores, set_threads
from lmforge.io import atomic_write_text
from lmforge.io import staged_dir
from lmforge.data.batches import BatchSource
from lmforge.losses import LossFn
from lmforge.train.budget import Clock, TrainingTime
from lmforge.train.config import ParallelConfig, TrainConfig
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
from lmforge.train.optim import build_optimizer
from lmforge.train.host import keep_freed_memory
from lmforge.train.progress import TrainingInterrupted, TrainingProgress, stop_at_step_boundary
from lmforge.train.precision import autocast_context, compute_dtype, grad_scaler
from lmforge.train.step import STEADY_AFTER, Callback, StepRunner, TrainingDiverged

__all__ = ["FINAL_DIR", "METRICS_FILE", "OUTPUTS", "STEADY_AFTER", "TrainingDiverged", "train"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
OUTPUTS = (CHECKPOINTS, FINAL_DIR, METRICS_FILE)  # everything train() writes in out_dir


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _prepare_frozen(frozen: Mapping[str, nn.Module], model: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """The frozen models a loss reads, on the device, in eval mode, without gradients; refused when they share a
    parameter with the trained model, which freezing would freeze too."""
    trained = {id(p) for p in model.parameters()}
    for name, module in frozen.items():
        if any(id(p) in trained for p in module.parameters()):
            raise ValueError(f"frozen model {name!r} shares parameters with the model being trained; pass a copy "
                             "(copy.deepcopy(model)) as the reference")  # fmt: skip
        module.to(device).eval().requires_grad_(False)
    return dict(frozen)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    loader: BatchSource,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    flops_per_token: float | None = None,
    tokens_per_batch: int | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    write_model_files: ModelWriter | None = None,
    parallel: ParallelConfig | None = None,
    val_batches: int | None = None,
    frozen: Mapping[str, nn.Module] | None = None,
    callbacks: Sequence[Callback] = (),
    clock: Clock = time.perf_counter,
) -> dict:
    """Train `model` for `cfg.max_steps` optimizer steps of `cfg.grad_accum` micro-batches from `loader`.

    `loss_fn(model, batch, ctx)` returns `(loss, metrics)` for one micro-batch (lmforge.losses: the loss is its
    share of the step, `ctx.tokens` being the step's loss tokens, which the loop counts). `loader` is a batch
    source (lmforge.data.batches.BatchSource); under several ranks it yields this rank's share of each global batch.
    Trainable extras (a value head) belong inside `model`; `frozen` models (a reference, a teacher) reach the loss
    as `ctx.frozen[name]`, on the device and in eval mode, and stay out of the optimizer and the checkpoints.
    `tokens_per_batch` is the tokens one optimizer step consumes over all ranks (all micro-batches together);
    when omitted it is counted from the first tensor of each batch. `flops_per_token` (training FLOPs, forward
    and backward) turns throughput into MFU. `val_fn(model)` returns a held-out loss (over `val_batches` batches,
    which the progress log names). `write_model_files(model, dir)` writes the model files of checkpoints and of
    `out_dir/final/`; without it only model.safetensors is written. `parallel` says how a torchrun job splits the
    work (pipeline stages need a loss that is an lmforge.losses.LogitsLoss). At every `cfg.eval_every` steps and
    the last, each of `callbacks(model, step)` returns metrics for that step's record (sample generations, a
    reward evaluation), the model in eval mode. With `cfg.max_time`, training stops at the first step that ends
    past that many seconds of training time read from `clock` (lmforge.train.budget), which the lr decay follows
    too. Returns the run's metrics, with the loss's metrics of the last
    step as `final_metrics` and the callbacks' of the last evaluation as `final_eval_metrics`.

    In a single process, Ctrl-C stops training at the end of the current step, saves a checkpoint of it and raises
    TrainingInterrupted (a KeyboardInterrupt); training again into `out_dir` resumes from it bit for bit.
    """
    out_dir = Path(out_dir)
    parallel = parallel or ParallelConfig()
    if not isinstance(loader, BatchSource):
        missing = [m for m in ("__next__", "state_dict", "load_state_dict", "loss_tokens") if not hasattr(loader, m)]
        raise TypeError(f"the loader {type(loader).__name__} is not a batch source (lmforge.data.batches."
                        f"BatchSource): it lacks {missing}")  # fmt: skip
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
    frozen = _prepare_frozen(frozen or {}, model, device)
    if frozen and world.pp_size > 1:
        raise ValueError("frozen models are not supported with pipeline parallelism; set parallel.pipeline=1")
    par = parallelize(model, world, parallel, cfg, loss_fn)
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
    peak = measure_peak_flops(device, compute_dtype(device, cfg.precision)) if flops_per_token else None
    if peak:
        peak *= world.world_size  # every rank measured its own device, under the same load
    start_step, process_start = state.step, time.perf_counter()
    seconds_before = state.train_seconds
    training_time = TrainingTime(clock, seconds_before, world, agree=cfg.max_time is not None)

    run = StepRunner(par, loss_fn, loader, autocast, cfg, tokens_per_batch, scaler, optimizer, val_fn, peak,
                     flops_per_token, start_step, out_dir, val_batches, frozen, callbacks, training_time)  # fmt: skip
    progress = TrainingProgress(cfg.max_steps, start_step, process_start - seconds_before, peak=peak,
                                flops_per_token=flops_per_token, compiled=par.compiled, bar=world.is_main)  # fmt: skip
    metrics_file = _open_metrics(out_dir / METRICS_FILE, state.step) if world.is_main else open(os.devnull, "w")
    with metrics_file, progress, stop_at_step_boundary(not world.distributed) as stop:
        # A run resumed after its budget was spent (a kill after the last checkpoint) has no step left.
        for step in range(state.step, cfg.max_steps if not run.out_of_time(state) else state.step):
            with collective_errors(f"training step {step + 1}", world):
                last = run.step(step, state, metrics_file, progress)
                # Read once: a Ctrl-C landing between two reads would stop without this step's checkpoint.
                stopping = stop.requested and not last
                if stopping:
                    logger.warning("Ctrl-C: saving a checkpoint of step %d, then stopping (Ctrl-C again stops at "
                                   "once)", state.step)  # fmt: skip
                if state.step % cfg.ckpt_every == 0 or last or stopping:
                    _save_checkpoint(out_dir, state, par, optimizer, loader, cfg, skeleton, write_model_files)
            if stopping:
                raise TrainingInterrupted(
                    f"training stopped by Ctrl-C after step {state.step} of {cfg.max_steps}; checkpoint saved in "
                    f"{list_checkpoints(out_dir)[-1][1]}; training again into {out_dir} resumes from it"
                )
            if last:
                break

    out_of_time = run.out_of_time(state)
    if out_of_time:
        logger.info("time budget train.max_time=%gs spent after step %d (%.1f s of training)", cfg.max_time,
                    state.step, state.train_seconds)  # fmt: skip
    state.train_seconds = training_time.elapsed()
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
        "final_metrics": state.last_metrics,
        "final_eval_metrics": state.eval_metrics,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, flops_per_token, peak) if peak and tokens_per_s else None,
        "peak_flops": peak,
        "train_seconds": state.train_seconds,
        "max_time": cfg.max_time,
        "stopped_by": "max_time" if out_of_time else "max_steps",
        "skipped_steps": state.skipped_steps,
        "resumed_from": resumed_from,
        "world_size": world.world_size,
        "parallel": {"data": parallel.data if world.dp_size > 1 else None, "dp": world.dp_size,
                     "pipeline": world.pp_size},  # fmt: skip
        "compiled": par.compiled,
    }


def _save_checkpoint(
    out_dir: Path,
    state: TrainerState,
    par: Parallelized,
    optimizer: Any,
    loader: BatchSource,
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
