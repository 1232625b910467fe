"""Settings of the training loop (`train`) and of how a torchrun job splits its work (`parallel`)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from lmforge.settings import Section

_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(value: Any) -> Any:
    """Seconds from `600`, `"600"`, `"90s"`, `"10m"` or `"1h30m"`; other values are returned for pydantic to refuse."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.fullmatch(text)
    if not text or match is None or not any(match.groups()):
        raise ValueError(f"{value!r} is not a duration: give seconds (600) or hours, minutes and seconds such as "
                         "'10m', '1h30m' or '90s'")  # fmt: skip
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class TrainConfig(Section):
    seq_len: int = Field(256, gt=0)
    # Sequences per micro-batch over all data-parallel ranks: each of N ranks reads batch_size / N of them, so the
    # global batch (batch_size x grad_accum) and the results do not depend on the number of ranks.
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(1000, gt=0)
    # Wall-clock budget in seconds, or "10m", "1h30m": training stops at the first step that ends past it (or at
    # max_steps, if sooner) and the lr decay follows the elapsed share of it instead of the steps (docs/training.md).
    max_time: float | None = Field(None, gt=0, allow_inf_nan=False)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    eval_every: int = Field(200, gt=0)
    eval_batches: int = Field(8, gt=0)
    ckpt_every: int = Field(200, gt=0)
    keep_last: int = Field(2, gt=0)
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool | Literal["auto"] = "auto"  # auto: compile where it is measured to help (CUDA), not on CPU
    # Recompute each checkpointed block's activations in the backward pass: 0 = none, 1 = every block,
    # k = every k-th block. Saves activation memory for about a third more compute on those blocks.
    activation_checkpointing: int = Field(0, ge=0)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: 2-D hidden matrices; AdamW (lr) for the rest
    muon_lr: float = Field(0.02, gt=0)
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    muon_ns_steps: int = Field(5, ge=1)  # Newton-Schulz iterations of the orthogonalisation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = Field(0, ge=0)  # CPU threads for torch; 0 = all cores
    max_bad_steps: int = Field(5, gt=0)  # consecutive NaN/inf/exploding steps before stopping
    spike_factor: float = Field(10.0, gt=1.0)  # a loss above spike_factor x its running mean counts as exploding

    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset({"threads", "ckpt_every", "keep_last"})

    _max_time = field_validator("max_time", mode="before")(parse_duration)


class ParallelConfig(Section):
    """How a run launched with torchrun splits its work (docs/distributed.md); ignored in a single process."""

    data: Literal["ddp", "fsdp"] = "ddp"  # replicate the model (DDP) or shard it (FSDP2 fully_shard)
    pipeline: int = Field(1, ge=1)  # pipeline stages: the blocks split over this many ranks
    microbatches: int = Field(0, ge=0)  # pipeline micro-batches per micro-batch; 0 = as many as stages
    schedule: Literal["1f1b", "gpipe"] = "1f1b"
    fsdp_cpu_offload: bool = False  # keep FSDP shards, gradients and optimizer state in host memory
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3) or keep them (ZeRO-2)
    # DDP: let a step leave some parameters without gradients (objectives that skip the output head).
    find_unused_parameters: bool = False
    timeout_s: float = Field(600.0, gt=0)  # a collective waiting longer than this ends the job with an error
