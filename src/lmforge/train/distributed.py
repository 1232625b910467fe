"""Distributed training on torch.distributed, applied to an unmodified model from outside.

A process launched by torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK) joins the job in `init_world`: NCCL on
CUDA, gloo on CPU, with `parallel.timeout_s` on every collective so that a dead or hung rank ends the job with an
error instead of a hang. The ranks form a 2-D mesh (pp, dp): `parallel.pipeline` pipeline stages, each replicated
over `world_size / pipeline` data-parallel ranks. Pipeline stages sit on the outer dimension, as in torchtitan,
so that across nodes only the light stage-to-stage activations travel, and the gradient reductions of data
parallelism stay inside a node.

`parallelize` prepares an unmodified model for training, always in this order, and returns a `Parallelized`, which
the training loop uses for everything that differs between a single process and many:

1. activation checkpointing (`train.activation_checkpointing`) on the blocks, first, so that every later wrapper
   (a pipeline stage reuses the blocks, FSDP shards them) runs the recomputing blocks;
2. the parallel layout (below): DDP, FSDP2, or pipeline stages;
3. `torch.compile` (`train.compile`) last, of what the loss calls: compiling the DDP wrapper lets dynamo split the
   graph at DDP's bucket boundaries so gradient communication still overlaps the backward. Pipeline stages run
   eager (the schedule drives them piece by piece).

The layouts:

- data parallel `ddp`: DistributedDataParallel (gradients averaged in buckets during backward; gradient
  accumulation skips the reduction on all but the last micro-batch);
- data parallel `fsdp`: FSDP2 `fully_shard` on every block, then on the whole model; parameters, gradients and
  optimizer state are sharded over the dp ranks, with an optional mixed-precision policy and CPU offload;
- pipeline (`parallel.pipeline` > 1): see `lmforge.train.pipelining`.

Every rank computes the same loss, metrics and gradient norm after the reductions, so the loop's decisions (skip
a step, stop on divergence) agree on all ranks without further messages.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.losses import LogitsLoss, LossFn
from lmforge.model.transformer import Block
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.device import resolve_device
from lmforge.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.train.precision import compute_dtype, use_compile

logger = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """A rank died, hung past the timeout, or lost its connection: the job cannot go on."""


@dataclass(frozen=True)
class World:
    """This process's place in the job. A single process is a world of one."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    mesh: Any = field(default=None, compare=False)  # DeviceMesh with dims ("pp", "dp"), None in one process
    timeout_s: float = 0.0  # how long a collective waits for the other ranks

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, dim: str) -> Any:
        """The process group of one mesh dimension ("dp" or "pp")."""
        return self.mesh.get_group(dim)


_world: World | None = None


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when the process was not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise DistributedError(f"WORLD_SIZE is set but {name} is not; launch with torchrun, which sets both")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def init_world(parallel: ParallelConfig, device_name: str = "auto") -> World:
    """Join the job torchrun launched (or describe the single process); idempotent within a process."""
    global _world
    if _world is not None:
        if _world.pp_size != parallel.pipeline:
            raise ValueError(f"this process already joined the job with {_world.pp_size} pipeline stages; "
                             f"parallel.pipeline={parallel.pipeline} cannot change within a process")  # fmt: skip
        return _world
    world_size = launched_world_size()
    if world_size <= 1:
        if parallel.pipeline > 1:
            raise ValueError(
                f"parallel.pipeline={parallel.pipeline} splits the model over {parallel.pipeline} processes, but this "
                f"is a single process; launch it with torchrun --nproc_per_node={parallel.pipeline} ..."
            )
        return World(device=resolve_device(device_name))
    if world_size % parallel.pipeline:
        raise ValueError(f"parallel.pipeline={parallel.pipeline} must divide the number of processes, {world_size}")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                   "use --nproc_per_node no larger than the GPU count")  # fmt: skip
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for the training tensors, gloo for anything kept on the host
    else:
        backend = "gloo"
    timeout = timedelta(seconds=parallel.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_shutdown)
    from torch.distributed.device_mesh import init_device_mesh

    pp = parallel.pipeline
    dp = world_size // pp
    mesh = init_device_mesh(device.type, (pp, dp), mesh_dim_names=("pp", "dp"))
    _world = World(device=device, rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world,
                   dp_rank=mesh.get_local_rank("dp"), dp_size=dp, pp_rank=mesh.get_local_rank("pp"), pp_size=pp,
                   mesh=mesh, timeout_s=parallel.timeout_s)  # fmt: skip
    logger.info("rank %d of %d joined (%s, dp %d/%d, pp %d/%d, device %s)", rank, world_size, backend,
                _world.dp_rank, dp, _world.pp_rank, pp, device)  # fmt: skip
    return _world


def _shutdown() -> None:
    global _world
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer that already died must not turn a clean exit into a crash
            dist.destroy_process_group()
    _world = None


def check_batch(train: TrainConfig, world: World) -> int:
    """The micro-batch rows each data-parallel rank reads: train.batch_size is the global micro-batch."""
    if train.batch_size % world.dp_size:
        raise ValueError(
            f"train.batch_size={train.batch_size} is the global micro-batch and must divide evenly over the "
            f"{world.dp_size} data-parallel ranks; use a multiple of {world.dp_size}"
        )
    return train.batch_size // world.dp_size


@contextlib.contextmanager
def collective_errors(what: str, world: World) -> Iterator[None]:
    """Turn a failed or timed-out collective into one clear DistributedError naming the rank and what it was doing."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, dist.DistError) as e:  # gloo/NCCL report lost peers and timeouts as RuntimeError
        if not world.distributed or not _looks_distributed(e):
            raise
        detail = str(e).splitlines()[0] if str(e) else "no message"
        waited = f" within parallel.timeout_s={world.timeout_s:g} s" if "timed out" in detail.lower() else ""
        raise DistributedError(
            f"rank {world.rank} of {world.world_size}: {what} failed because another rank stopped answering"
            f"{waited} ({type(e).__name__}: {detail}). The job stops here; "
            "the first failing rank's log names the cause. Rerun the same command to resume from the last checkpoint."
        ) from e


def _looks_distributed(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                                   "process group", "broken pipe"))  # fmt: skip


@dataclass
class Parallelized:
    """A model made ready for one world: what the loop calls, what it optimizes, how it reduces."""

    world: World
    module: nn.Module  # what the loss function is given: the DDP wrapper, sharded model or model, maybe compiled
    state_module: nn.Module  # owns the parameters this rank trains: optimizer and state dicts are built from it
    eval_module: nn.Module  # what the validation function is given
    pipeline: Any = None  # lmforge.train.pipelining.PipelineRunner when pipelining
    fsdp: bool = False
    ddp: nn.parallel.DistributedDataParallel | None = None
    compiled: bool = False
    metric_names: list[str] | None = None  # the loss's metrics, fixed by the first step

    def accumulation(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP: skip the gradient all-reduce on every micro-batch but the last one of a step."""
        if not last and self.ddp is not None:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def _sum_over_world(self, value: Tensor, what: str = "averaging the loss") -> Tensor:
        with collective_errors(what, self.world):
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def global_count(self, local: int) -> Tensor:
        """A step's loss tokens over all data-parallel ranks (at least 1), left on the device: no host sync."""
        count = torch.full((), local, dtype=torch.int64, device=self.world.device)
        if self.world.dp_size > 1:
            with collective_errors("counting the step's loss tokens", self.world):
                dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self.world.group("dp"))
        return count.clamp(min=1)

    def reduce_step(self, loss: Tensor, metrics: dict[str, Tensor], parts: int) -> tuple[Tensor, dict[str, Tensor]]:
        """In one all_reduce: the step's loss (the sum of the shares of all micro-batches on all data-parallel
        ranks, as the last pipeline stage computed them) and each metric's mean over the step's `parts`."""
        names = self._agree_names(sorted(metrics))
        mine = self.pipeline is None or self.pipeline.is_last
        values = torch.stack([loss.detach().float(), *(metrics[n] for n in names)]) if mine else \
            torch.zeros(1 + len(names), device=loss.device)  # fmt: skip
        if self.world.distributed:
            values = self._sum_over_world(values, "reducing the loss and its metrics")
        return values[0], {n: values[1 + i] / parts for i, n in enumerate(names)}

    def _agree_names(self, names: list[str]) -> list[str]:
        """The metric names of every step: the first step's. Pipeline stages before the last compute no loss, so
        they learn the names from the last stage once."""
        if self.metric_names is None:
            if self.pipeline is not None and self.world.distributed:
                w = self.world
                shared = [names if self.pipeline.is_last else None]
                with collective_errors("sharing the loss's metric names", w):
                    dist.broadcast_object_list(shared, src=(w.pp_size - 1) * w.dp_size)
                names = shared[0]
            self.metric_names = names
        elif (self.pipeline is None or self.pipeline.is_last) and names != self.metric_names:
            raise ValueError(f"the loss returned the metrics {names}, but {self.metric_names} at the first step; a "
                             "loss must return the same metric names at every step")  # fmt: skip
        return self.metric_names

    def agree(self, value: float) -> float:
        """A value every rank must agree on (a validation loss), taken from the rank that computes it properly:
        rank 0, or with a pipeline the last stage of the first data-parallel group."""
        if not self.world.distributed:
            return value
        w = self.world
        source = w.pp_rank == w.pp_size - 1 if self.pipeline is not None else w.rank == 0
        source = source and w.dp_rank == 0
        t = torch.tensor(value if source else 0.0, dtype=torch.float64, device=w.device)
        return float(self._sum_over_world(t))

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Clip all trained gradients together to `max_norm` (inf: measure only); returns the global norm."""
        params = [p for p in self.state_module.parameters() if p.grad is not None]
        if self.pipeline is None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # Each stage holds part of the parameters: the global norm adds the stages' squared norms.
        local = torch.zeros((), dtype=torch.float32, device=self.world.device)
        for p in params:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            local += g.detach().float().pow(2).sum()
        with collective_errors("reducing the gradient norm", self.world):
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.world.group("pp"))
        norm = local.sqrt()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef.to(p.grad.device))
        return norm

    def sync_pipeline_grads(self) -> None:
        """Pipeline with DDP-style data parallelism: average each stage's gradients over its dp replicas."""
        if self.pipeline is None or self.world.dp_size == 1 or self.fsdp:
            return
        group = self.world.group("dp")
        with collective_errors("averaging gradients", self.world):
            for p in self.state_module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
                    p.grad.div_(self.world.dp_size)


def _fully_shard() -> Callable[..., Any]:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _fsdp_policies(parallel: ParallelConfig, train: TrainConfig, device: torch.device) -> dict[str, Any]:
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    except ImportError:
        from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    kwargs: dict[str, Any] = {"reshard_after_forward": parallel.fsdp_reshard_after_forward}
    dtype = compute_dtype(device, train.precision)
    if dtype == torch.float16:
        raise ValueError("parallel.data=fsdp does not support train.precision=fp16 (its loss scaler is not sharded); "
                         "use bf16, which needs no scaler")  # fmt: skip
    if dtype != torch.float32:
        # Weights are gathered in the compute dtype and gradients reduced in fp32; master weights stay fp32.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if parallel.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def _shard(module: nn.Module, blocks: Iterable[nn.Module], mesh: Any, kwargs: dict[str, Any]) -> None:
    fully_shard = _fully_shard()
    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(module, mesh=mesh, **kwargs)


def parallelize(model: nn.Module, world: World, parallel: ParallelConfig, train: TrainConfig,
                loss_fn: LossFn | None = None) -> Parallelized:  # fmt: skip
    """Prepare `model` (already on `world.device`) for training in `world`: activation checkpointing, then the
    parallel layout, then compilation (see the module docstring). Pipeline stages run `loss_fn`, which must then be
    an lmforge.losses.LogitsLoss."""
    if train.activation_checkpointing:
        wrapped = apply_activation_checkpointing(model, train.activation_checkpointing)
        logger.info("activation checkpointing on %d blocks (every %d)", wrapped, train.activation_checkpointing)
    par = _layout(model, world, parallel, train, loss_fn)
    if use_compile(train.compile, world.device):
        if par.pipeline is not None:
            logger.warning("train.compile is not applied to pipeline stages; they run eager")
        else:
            par.module, par.compiled = torch.compile(par.module), True
    return par


def _layout(model: nn.Module, world: World, parallel: ParallelConfig, train: TrainConfig,
            loss_fn: LossFn | None) -> Parallelized:  # fmt: skip
    """`model` wrapped for `world`'s data and pipeline parallelism; a single process gets it back unchanged."""
    if not world.distributed:
        return Parallelized(world, model, model, model)
    dp_mesh = world.mesh["dp"]
    if world.pp_size > 1:
        from lmforge.train.pipelining import build_pipeline

        if not isinstance(loss_fn, LogitsLoss):
            raise ValueError("this training stage does not support pipeline parallelism (its loss cannot be "
                             "computed from the logits alone, see lmforge.losses.LogitsLoss); set parallel.pipeline=1")
        fsdp = parallel.data == "fsdp" and world.dp_size > 1
        policies = _fsdp_policies(parallel, train, world.device) if fsdp else {}
        shard = (lambda stage, blocks: _shard(stage, blocks, dp_mesh, policies)) if fsdp else None
        runner = build_pipeline(model, world, parallel, train, loss_fn, shard)
        return Parallelized(world, runner.stage_module, runner.stage_module, runner.eval_module, pipeline=runner,
                            fsdp=fsdp)  # fmt: skip
    if parallel.data == "fsdp":
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        _shard(model, blocks, dp_mesh, _fsdp_policies(parallel, train, world.device))
        return Parallelized(world, model, model, model, fsdp=True)
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[world.device.index] if world.device.type == "cuda" else None,
        process_group=world.group("dp"),
        find_unused_parameters=parallel.find_unused_parameters,
    )
    # Validation runs on the plain model: every rank holds the same weights, so no communication is needed.
    return Parallelized(world, ddp, model, model, ddp=ddp)
