"""Muon: momentum whose update is orthogonalised by a Newton-Schulz iteration, for 2-D hidden weight matrices.

For a matrix parameter W (out x in) with gradient G, one step is

    B  <- momentum * B + G                      momentum buffer (heavy ball, as torch's SGD)
    M  =  G + momentum * B                      Nesterov look-ahead (or M = B without Nesterov)
    O  ~  U V^T  where M = U S V^T              quintic Newton-Schulz, no SVD
    W  <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, out / in)) * O

Orthogonalising replaces every singular value of the momentum by (roughly) one, so the update moves W by the same
amount along every direction the gradient history spans instead of mostly along its few dominant directions.

Newton-Schulz. X_0 = M / ||M||_F puts every singular value in [0, 1]; each iteration applies the odd polynomial
p(x) = a x + b x^3 + c x^5 to the singular values (X <- a X + (b A + c A^2) X with A = X X^T) and leaves the
singular vectors alone. The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) trade exact convergence for a
steep slope at zero (a = 3.4445), so five iterations lift even small singular values: every singular value at or
above 0.0016 ||M||_F ends in [0.68, 1.21] (measured on the scalar map; the iteration never reaches exactly 1, and
the spread does not matter for training). Singular values below that stay smaller, as they should: they are
directions the gradient barely touches. When out > in the iteration runs on the transpose, so the Gram matrix A
is the smaller (in x in) one. On CUDA the iteration runs in bf16 (its fixed point is insensitive to rounding and
the matmuls are several times faster); elsewhere in fp32, as CPUs have no fast bf16 matmul.

Update scale. An orthogonalised O has every singular value about 1, hence Frobenius norm sqrt(min(out, in)) and
entry RMS 1 / sqrt(max(out, in)): left alone, wide MLP matrices would get smaller per-entry steps than the square
attention matrices. Multiplying by sqrt(max(1, out / in)) makes the entry RMS 1 / sqrt(in) for every shape, the
scale the weights themselves are initialised at (std proportional to 1 / sqrt(fan_in)), so every matrix of a
block changes by the same fraction of its size per step; equivalently the update's spectral norm is
sqrt(out / in) for tall matrices, the scaling under which feature learning is width-independent. This is the
convention the usual default lr of 0.02 (the recipe's `muon_lr`) belongs to. The alternative,
0.2 * sqrt(max(out, in)), matches AdamW's typical update RMS so AdamW's lr can be reused, but it calls for an
lr near AdamW's and would make 0.02 about ten times too large.

Weight decay is decoupled and scaled by the effective lr, as in AdamW.

`lr_scale` (a group key) multiplies `lr` inside `step`: a training loop that writes one scheduled lr into every
group of a combined Muon + AdamW optimizer still gives Muon its own peak lr (see `lmforge.train.optim`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Smallest singular value, as a fraction of the Frobenius norm, that five iterations bring into NS_BAND.
NS_FLOOR = 0.0016
NS_BAND = (0.68, 1.21)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix, or a batch of matrices (..., rows, cols): U S V^T -> U S' V^T, S' ~ 1.

    Returns fp32 (bf16 on CUDA). See the module docstring for the singular values it guarantees.
    """
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a, b, c = NS_COEFFICIENTS
    shape = g.shape
    x = g.float().reshape(-1, *shape[-2:])  # one batch dimension, for baddbmm
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    if x.is_cuda:
        x = x.bfloat16()
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    if tall:
        x = x.mT
    return x.reshape(shape)


def update_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """sqrt(max(1, out / in)): gives an orthogonalised update entry RMS 1 / sqrt(in) whatever its shape."""
    rows, cols = shape[-2], shape[-1]
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (see the module docstring). Every parameter given must be a matrix.

    Group keys: lr, lr_scale (the applied lr is lr * lr_scale), momentum, nesterov, ns_steps, weight_decay.
    State per parameter: momentum_buffer, in the parameter's dtype.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        lr_scale: float = 1.0,
    ) -> None:
        if lr < 0 or lr_scale < 0:
            raise ValueError(f"lr and lr_scale must be >= 0, got {lr} and {lr_scale}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, lr_scale=lr_scale, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon optimises 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - the torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_scale"]
            momentum, wd = group["momentum"], group["weight_decay"]
            params, directions = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                params.append(p)
                directions.append(p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf)
            # Matrices of one shape (q/k/v/o, gate/up of every block) are orthogonalised as one batch.
            by_shape: dict[tuple[torch.Size, torch.device], list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[(p.shape, p.device)].append(i)
            for (shape, _), idx in by_shape.items():
                batch = torch.stack([_full(directions[i]) for i in idx])
                ortho = newton_schulz(batch, group["ns_steps"])
                alpha = -lr * update_scale(shape)
                for j, i in enumerate(idx):
                    p = params[i]
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    _local(p).add_(_shard_like(ortho[j], p).to(p.dtype), alpha=alpha)
        return loss


# FSDP shards each matrix over the data-parallel ranks (a DTensor), but orthogonalisation needs the whole matrix:
# each rank gathers the momentum direction, orthogonalises it, and applies the rows of the update it holds. The
# result equals the unsharded update; the cost is one all-gather per matrix and redundant Newton-Schulz work.


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of `full` that parameter `p` holds on this rank (all of it for a plain tensor)."""
    if not hasattr(p, "device_mesh"):
        return full
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return replicated.redistribute(p.device_mesh, p.placements).to_local()
