"""Device, numeric precision and CPU threads, chosen from settings and applied around an unmodified model."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; `cpu`, `cuda` and `cuda:N` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} asked for CUDA, but this torch build sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype the matmuls run in under `precision` on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.float32


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A context for the forward pass: bf16 autocast, or nothing when the run is fp32.

    Weights and optimizer state stay fp32 either way; only the forward's matmuls change dtype.
    """
    dtype = compute_dtype(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cpu":
        # CPUs without AMX or AVX512-BF16/FP16 emulate half-precision matmuls, which costs far more than it saves.
        logger.warning("%s autocast on CPU is usually far slower than fp32; use precision=fp32 or auto",
                       precision)  # fmt: skip
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 autocast, whose small exponent range underflows gradients without one; else None.

    bf16 keeps fp32's exponent range and needs no scaling.
    """
    if compute_dtype(device, precision) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(n: int) -> int:
    """Use `n` CPU threads for torch ops (0 = every core this process may run on); returns the count set."""
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    if n == 0:
        n = available_cores()
    torch.set_num_threads(n)
    return n


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """Whether to torch.compile the model: `auto` compiles on CUDA only.

    On CPU the gain depends on the model and the run length (docs/benchmarks.md): the default recipe's block is
    10% faster compiled and sets compile: true, the earlier Llama block was slower, and short or tiny runs never
    repay the ~15 s of compilation, so `auto` leaves CPU runs eager.
    """
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)
