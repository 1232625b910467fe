"""Peak matmul throughput of this machine, measured, and model FLOPs utilisation (MFU) against it.

MFU here is relative to what dense square matmuls actually reach on the device in this process, not to a
datasheet number, so it says how much of the reachable speed the training step uses.
"""

from __future__ import annotations

import time

import torch

_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """FLOP/s of back-to-back square matmuls on `device` in `dtype`; measured once per process per (device, dtype)."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    # Large enough to saturate every core's vector units, small enough that one matmul takes milliseconds.
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    _sync(device)
    # The best of several short windows: on a shared machine the average would measure the neighbours' load,
    # while the peak is what the device can do when it is ours.
    peak, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):  # several matmuls per clock read, so GPU launches are not serialised by syncs
            torch.mm(a, b, out=out)
        _sync(device)
        peak = max(peak, 2.0 * n**3 * 4 / (time.perf_counter() - start))
    _PEAK_CACHE[key] = peak
    return peak


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Share of `peak` FLOP/s used by training at `tokens_per_s` when each token costs `flops_per_token`."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak
