"""Pipeline parallelism with torch.distributed.pipelining: the blocks split into stages, one per pipeline rank.

Stage k holds a contiguous run of blocks; the first stage also holds the token (and position) embeddings, the
last the final norm and the output head. Blocks are split as evenly as possible, with any extra block going to
the earlier stages, since the last stage also carries the vocabulary-sized head. A stage module reuses the
model's own submodules under their own names (`model.layers.3.mlp.up_proj.weight` stays that), so optimizer
state and distributed checkpoints use the single-process parameter names and move freely between layouts; the
parts of the model a rank does not run are moved to the meta device and take no memory.

Each micro-batch of the training loop is cut into `parallel.microbatches` pipeline micro-batches and run with a
GPipe or 1F1B schedule. The last stage computes each pipeline micro-batch's loss with the stage's own loss
function (`from_logits` of an lmforge.losses.LogitsLoss), given the step's loss-token count, so its losses are
shares of the step's loss that add up (the schedule does not rescale gradients) to what one process computes.

Pipelining covers causal language modelling over plain rows: a stage passes one activation tensor to the next,
so attention masks beyond the causal one (document masking, prefixes, bidirectional objectives) are refused.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.losses import LogitsLoss, LossContext, Metrics
from lmforge.model.transformer import Transformer, attention_mask
from lmforge.train.config import ParallelConfig, TrainConfig

logger = logging.getLogger(__name__)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """The blocks of each stage: contiguous, sizes differing by at most one, larger ones first."""
    if n_layers < n_stages:
        raise ValueError(f"parallel.pipeline={n_stages} stages need at least as many blocks; the model has {n_layers}")
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n_layers), n_stages)])
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class StageModule(nn.Module):
    """Blocks `layers` of a Transformer, with the embeddings on the first stage and norm + head on the last.

    forward: token ids [B, T] (first stage) or activations [B, T, d] -> activations, or logits on the last stage,
    through the Transformer's own parts (embed, rope, head), so a stage computes exactly what the model does.
    """

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.args, self.first, self.last = model.args, first, last
        object.__setattr__(self, "_whole", model)  # not a submodule: the stage's parameters are only its own
        self.model = nn.Module()
        if first:
            self.model.embed_tokens = model.model.embed_tokens
            if not model.rotary:
                self.model.embed_positions = model.model.embed_positions
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        if last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head

    def forward(self, x: Tensor) -> Tensor:
        whole: Transformer = self._whole
        T = x.shape[1]
        mask, causal = attention_mask("causal", T, device=x.device)
        if self.first:
            x = whole.embed(x)
        cos, sin = whole.rope(0, T)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, cache=None, mask=mask, causal=causal)
        return whole.head(x) if self.last else x


def _free_unused(model: Transformer, stage: StageModule) -> None:
    """Move every part of `model` this stage does not run to the meta device, releasing its memory."""
    kept = {id(p) for p in stage.parameters()}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in kept:
                setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))


class PipelineRunner:
    """One rank's stage and schedule; `step` runs a training micro-batch through the whole pipeline."""

    def __init__(self, stage_module: StageModule, world: Any, n_micro: int, rows: int, loss: LogitsLoss) -> None:
        self.stage_module, self.world = stage_module, world
        self.n_micro, self.rows, self.loss = n_micro, rows, loss
        self.is_first, self.is_last = stage_module.first, stage_module.last
        self.blocks = list(stage_module.model.layers.values())
        self.eval_module = PipelineEvalModule(self)
        self.schedule: Any = None  # set by build_pipeline: the schedule calls `chunk_loss`
        self.no_outputs = False  # whether the schedule can be told to keep no outputs (set with it)
        self._ctx: LossContext | None = None  # the current training step's
        self._collected: list[tuple[Tensor, Metrics]] | None = None  # its pipeline micro-batches' results

    def chunk_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The schedule's loss of one pipeline micro-batch: the stage's loss, times the data-parallel ranks,
        whose gradients are averaged while the step's loss is the sum of their shares."""
        loss, metrics = self.loss.from_logits(logits, labels, self._ctx)
        if self._collected is not None:  # a training step (evaluation also runs the schedule's loss)
            self._collected.append((loss.detach().float(), metrics))
        return loss * self.world.dp_size

    def _run(self, x: Tensor | None, target: Tensor | None, losses: list | None, train: bool) -> Any:
        args = (x,) if self.is_first else ()
        kwargs: dict[str, Any] = {}
        if self.is_last:
            kwargs.update(target=target, losses=losses)
        if train:
            if self.no_outputs:
                kwargs["return_outputs"] = False  # the loss is all the loop needs; keep no logits around
            return self.schedule.step(*args, **kwargs)
        return self.schedule.eval(*args, **kwargs)

    def step(self, batch: Any, ctx: LossContext) -> tuple[Tensor, Metrics]:
        """Forward and backward of one loop micro-batch; returns its loss share and metrics on the last stage (0
        and none elsewhere). Its metrics are the mean over its pipeline micro-batches, each of which counts as a
        part of the step."""
        x, y = self.loss.split(batch)
        device = self.world.device
        if x.shape[0] != self.rows:
            raise ValueError(f"pipeline micro-batch has {x.shape[0]} rows, the schedule was built for {self.rows}")
        self._ctx, self._collected = replace(ctx, parts=ctx.parts * self.n_micro), []
        try:
            self._run(x.to(device), y.to(device), None, train=True)
            collected = self._collected
        finally:
            self._collected = None
        if not self.is_last:
            return torch.zeros((), device=device), {}
        # The last n_micro calls are the pipeline micro-batches': on its first step torch (2.13) calls the loss
        # once more before them, on a micro-batch of inputs, to infer the shapes of the backward.
        collected = collected[-self.n_micro :]
        loss = torch.stack([loss for loss, _ in collected]).sum()
        names = collected[0][1]
        metrics = {n: torch.stack([torch.as_tensor(m[n], device=device).detach().float() for _, m in collected]).mean()
                   for n in names}  # fmt: skip
        return loss, metrics


class PipelineEvalModule(nn.Module):
    """The pipeline as a model for validation: model(ids) gives logits on the last stage.

    Other stages get a zero tensor of the logits' shape: the loop takes the validation loss from the last stage
    (Parallelized.agree). Batches are cut or padded to the schedule's row count, which its buffers were built for.
    """

    def __init__(self, runner: PipelineRunner) -> None:
        super().__init__()
        self.stage_module = runner.stage_module
        object.__setattr__(self, "_runner", runner)  # not a submodule: parameters() are the stage's own

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        if kwargs.get("attn", "causal") != "causal" or any(
            kwargs.get(k) is not None for k in ("cache", "prefix_len", "doc_ids")
        ) or kwargs.get("return_hidden"):  # fmt: skip
            raise ValueError("a pipelined model evaluates plain causal attention only")
        runner = self._runner
        B, T = input_ids.shape
        outputs = []
        for start in range(0, B, runner.rows):
            chunk = input_ids[start : start + runner.rows]
            n = chunk.shape[0]
            if n < runner.rows:
                chunk = torch.cat([chunk, chunk.new_zeros(runner.rows - n, T)])
            # The schedule computes a loss on the last stage; its target here is a placeholder and the loss unused.
            out = runner._run(chunk, torch.zeros_like(chunk), [], train=False)
            if runner.is_last:
                outputs.append(out[:n])
        if runner.is_last:
            return torch.cat(outputs)
        vocab = runner.stage_module.args.vocab_size
        return torch.zeros((), device=input_ids.device).expand(B, T, vocab)


def build_pipeline(model: nn.Module, world: Any, parallel: ParallelConfig, train: TrainConfig, loss: LogitsLoss,
                   shard: Callable[[nn.Module, list[nn.Module]], None] | None = None) -> PipelineRunner:  # fmt: skip
    """This rank's stage of `model`, and the schedule that runs it with `loss`; `shard(stage, blocks)` (FSDP over
    the data-parallel ranks) is applied to the stage before the schedule is built around it."""
    try:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    except ImportError as e:
        raise RuntimeError(f"parallel.pipeline needs torch.distributed.pipelining (torch >= 2.5): {e}") from e
    if not isinstance(model, Transformer):
        raise ValueError(f"pipeline parallelism splits an lmforge Transformer; got {type(model).__name__}")
    if model.args.tie_embeddings:
        raise ValueError("parallel.pipeline > 1 needs model.tie_embeddings=false: the embedding lives on the first "
                         "stage and the output head on the last, so one shared matrix cannot be on both")  # fmt: skip
    k = world.pp_size
    layers = stage_layers(model.args.n_layers, k)[world.pp_rank]
    stage_module = StageModule(model, layers, first=world.pp_rank == 0, last=world.pp_rank == k - 1)
    _free_unused(model, stage_module)
    n_micro = parallel.microbatches or k
    rows = train.batch_size // world.dp_size
    if rows % n_micro:
        raise ValueError(f"each rank's micro-batch of {rows} rows (train.batch_size / data-parallel ranks) must split "
                         f"into parallel.microbatches={n_micro} equal pipeline micro-batches")  # fmt: skip
    if parallel.schedule == "1f1b" and n_micro < k:
        raise ValueError(f"the 1F1B schedule needs parallel.microbatches >= {k} stages, got {n_micro}")
    if shard is not None:
        shard(stage_module, list(stage_module.model.layers.values()))
    stage = PipelineStage(stage_module, world.pp_rank, k, world.device, group=world.group("pp"))
    cls = Schedule1F1B if parallel.schedule == "1f1b" else ScheduleGPipe
    runner = PipelineRunner(stage_module, world, n_micro, rows, loss)
    try:
        runner.schedule = cls(stage, n_micro, loss_fn=runner.chunk_loss, scale_grads=False)
    except TypeError as e:  # torch 2.5 schedules always rescale gradients
        raise RuntimeError(f"parallel.pipeline needs torch >= 2.6 (schedules with scale_grads): {e}") from e
    runner.no_outputs = "return_outputs" in inspect.signature(runner.schedule.step).parameters
    logger.info("pipeline stage %d/%d: blocks %d-%d%s%s, %s schedule, %d micro-batches of %d rows", world.pp_rank,
                k, layers.start, layers.stop - 1, " + embeddings" if stage_module.first else "",
                " + head" if stage_module.last else "", parallel.schedule, n_micro, rows // n_micro)  # fmt: skip
    return runner
