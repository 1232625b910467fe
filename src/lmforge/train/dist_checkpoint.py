"""Training checkpoints of distributed runs, with torch.distributed.checkpoint (DCP), loadable at any world size.

    out_dir/checkpoints/step_000200/
        dcp/                   model and optimizer state, each rank writing its own shards (DCP files)
        model.safetensors      the full weights (plus model.json / tokenizer.json): what every lmforge tool reads
        rng.safetensors        rank 0's torch RNG state
        trainer_state.json     step, counters, loader position, Python/NumPy RNG, the world that wrote it

State is keyed by parameter name, the optimizer's too (flattened, so every parameter carries its group's
hyperparameters): a checkpoint written by 2 data-parallel ranks, by FSDP shards or by pipeline stages loads
into 1 process, and a single-process checkpoint loads into any layout. The loader position does not depend on
the world size either (data loaders count global batches), so a run can move between world sizes and continue
with the same data order.

Writing follows the single-process rule: every rank writes into `step_XXXXXX.tmp`, rank 0 fsyncs it and renames
it, so a directory named `step_XXXXXX` is always complete, whatever rank is killed when.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.io import fsync_dir
from lmforge.train.checkpoint import (
    RNG_FILE,
    STATE_FILE,
    ModelWriter,
    TrainerState,
    _host_rng_state,
    _restore_rng,
    _rng_tensors,
    begin_checkpoint,
    checkpoint_root,
    fsync_tree,
    publish_checkpoint,
    write_model,
)
from lmforge.train.optim import CombinedOptimizer

logger = logging.getLogger(__name__)

DCP_DIR = "dcp"


def optimizer_parts(optimizer: Any) -> list[torch.optim.Optimizer]:
    return list(optimizer.optimizers) if isinstance(optimizer, CombinedOptimizer) else [optimizer]


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Flattened optimizer state: keyed by parameter name, so stages and shards of any layout line up.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def model_skeleton(model: nn.Module, is_main: bool) -> nn.Module | None:
    """A plain copy of the model on rank 0, taken before it is wrapped, sharded or split: checkpoints load the
    full weights into it to write the model files every tool reads. None on other ranks."""
    if not is_main:
        return None
    skeleton = copy.deepcopy(model).to("cpu")
    skeleton.requires_grad_(False)
    return skeleton


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def load_full_model(skeleton: nn.Module, dcp_dir: Path) -> None:
    """Read the full weights of a DCP checkpoint into `skeleton`, in this process alone."""
    import torch.distributed.checkpoint as dcp

    state = {"model": skeleton.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
    skeleton.load_state_dict(state["model"])


def save_distributed_checkpoint(
    out_dir: Path,
    state: TrainerState,
    module: nn.Module,
    optimizer: Any,
    loader: Any,
    *,
    world: Any,
    skeleton: nn.Module | None,
    keep_last: int,
    write_model_files: ModelWriter | None = None,
) -> Path:
    """Every rank calls this together; returns the checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoint_root(out_dir)
    final = root / f"step_{state.step:06d}"
    tmp = root / f"{final.name}.tmp"
    if world.is_main:
        begin_checkpoint(out_dir, state.step, keep_last)
    _barrier()
    model_state, optim_state = get_state_dict(module, optimizer_parts(optimizer), options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
    if world.is_main:
        assert skeleton is not None
        load_full_model(skeleton, tmp / DCP_DIR)
        write_model(skeleton, tmp, write_model_files)
        save_file(_rng_tensors(), str(tmp / RNG_FILE))
        trainer = {
            "state": asdict(state),
            "loader": loader.state_dict(),
            "rng": _host_rng_state(),
            "world": {"world_size": world.world_size, "dp": world.dp_size, "pp": world.pp_size},
        }
        (tmp / STATE_FILE).write_text(json.dumps(trainer), encoding="utf-8")
        publish_checkpoint(out_dir, tmp, final, keep_last)
        logger.info("saved distributed checkpoint %s (%d ranks)", final, world.world_size)
    _barrier()  # no rank goes on (or looks for checkpoints) before the rename
    return final


def load_distributed_checkpoint(path: Path, module: nn.Module, optimizer: Any, loader: Any) -> TrainerState:
    """Restore a DCP checkpoint into this process's part of the model (any layout, or a plain model in a single
    process), with its optimizer, loader and RNG state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    parts = optimizer_parts(optimizer)
    model_state, optim_state = get_state_dict(module, parts, options=_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_state_dict(module, parts, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options())
    trainer = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    loader.load_state_dict(trainer["loader"])
    _restore_rng(load_file(str(Path(path) / RNG_FILE)), trainer["rng"])
    saved = trainer.get("world", {})
    logger.info("resuming from %s (step %d, written by %s ranks)", path, trainer["state"]["step"],
                saved.get("world_size", "?"))  # fmt: skip
    return TrainerState(**trainer["state"])


def add_distributed_copy(path: Path, module: nn.Module, optimizer: Any) -> None:
    """Give a single-process checkpoint a DCP copy of its model and optimizer state, so that a distributed run
    resumes from it by the one DCP path. Run by rank 0 alone, with `module` and `optimizer` loaded from `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer_parts(optimizer), options=_options())
    tmp = Path(path) / f"{DCP_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp), no_dist=True)
    fsync_tree(tmp)
    tmp.rename(Path(path) / DCP_DIR)
    fsync_dir(Path(path))
    logger.info("added a distributed copy of single-process checkpoint %s", path)
