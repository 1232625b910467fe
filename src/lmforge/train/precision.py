"""Numeric precision and compilation, chosen from settings and applied around an unmodified model.

Device and thread choice live in lmforge.device, since inference and evaluation need them too."""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """Whether to torch.compile the model: `auto` compiles on CUDA only.

    On CPU the gain depends on the model and the run length (docs/benchmarks.md): the default recipe's block is
    10% faster compiled and sets compile: true, the earlier Llama block was slower, and short or tiny runs never
    repay the ~15 s of compilation, so `auto` leaves CPU runs eager.
    """
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)
