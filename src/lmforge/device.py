"""Device and CPU-thread choice, shared by training, evaluation and inference (so none imports another for it)."""

from __future__ import annotations

import os

import torch


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
