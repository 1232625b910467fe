"""Training checkpoints: everything needed to continue a run bit for bit, as plain files, never a pickle.

    out_dir/checkpoints/step_000200/
        model.safetensors      weights (plus model.json / tokenizer.json when a model-files writer is given)
        optimizer.safetensors  every optimizer tensor, named "<param index>.<key>"
        rng.safetensors        torch CPU RNG state and one state per CUDA device
        trainer_state.json     step, counters, loss statistics, loader position, optimizer hyperparameters,
                               python and numpy RNG states
    out_dir/checkpoints/LATEST the newest checkpoint's directory name, for other tools

A checkpoint is written into `step_XXXXXX.tmp`, fsynced and renamed, so a directory named `step_XXXXXX` is
always complete; older ones are deleted only after that. Resuming scans for the newest complete directory rather
than trusting LATEST, because a kill between the rename and the LATEST update leaves LATEST one behind.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmforge.io import atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")

ModelWriter = Callable[[nn.Module, Path], None]


@dataclass
class TrainerState:
    """The loop's own counters; everything here round-trips exactly through JSON."""

    step: int = 0  # optimizer steps completed, skipped ones included
    tokens: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    bad_losses: list[float] = field(default_factory=list)  # losses of the current run of bad steps
    good_steps: int = 0
    loss_mean: float | None = None  # running mean of good losses, the spike guard's reference
    last_loss: float | None = None
    val_loss: float | None = None
    train_seconds: float = 0.0
    steady_tokens: int = 0  # tokens and seconds of steady-state steps, for the throughput figure
    steady_seconds: float = 0.0
    loss_scale: float | None = None  # fp16 runs: the gradient scaler's scale and growth counter, for exact resume
    scale_growth: int = 0
    last_metrics: dict[str, float | None] = field(default_factory=dict)  # the loss's metrics at the last step
    eval_metrics: dict[str, float | None] = field(default_factory=dict)  # the callbacks' at the last evaluation


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, directory), oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _remove_partial(root: Path) -> None:
    for path in root.glob("step_*.tmp"):
        logger.info("removing incomplete checkpoint %s left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush a directory's files, subdirectories included, and the directories themselves: the rename that follows
    must not outrun the data."""
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(Path(root) / name)
        fsync_dir(Path(root))


def begin_checkpoint(out_dir: Path, step: int, keep_last: int) -> tuple[Path, Path]:
    """(staging directory, final directory) for `step`'s checkpoint, the staging one created empty."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; a step is never checkpointed twice")
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, final


def publish_checkpoint(out_dir: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Flush and rename the staging directory, point LATEST at it, then drop all but the newest `keep_last`."""
    root = checkpoint_root(out_dir)
    fsync_tree(tmp)
    tmp.rename(final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        # Renamed first, so a kill halfway through the delete leaves a .tmp that is cleaned up, never a
        # half-empty step directory that looks complete.
        doomed = old.with_name(old.name + ".tmp")
        old.rename(doomed)
        shutil.rmtree(doomed)
    _remove_partial(root)


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer state into named tensors and JSON-able scalars and hyperparameters."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = defaultdict(dict)
    for idx, param_state in sd["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[str(idx)][key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": dict(scalars)}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = defaultdict(dict)
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state[int(idx)][key] = value
    for idx, values in meta["scalar_state"].items():
        state[int(idx)].update(values)
    # JSON turned tuples (AdamW's betas) into lists; the optimizer expects them back as they were.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]  # fmt: skip
    optimizer.load_state_dict({"state": dict(state), "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return tensors


def _host_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], host: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[f"cuda_{i}"] for i in range(len(tensors) - 1)]
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            logger.warning("checkpoint has %d CUDA RNG states, this machine %d CUDA devices; CUDA RNG not restored",
                           len(cuda_states), torch.cuda.device_count())  # fmt: skip
        else:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = host["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_model(model: nn.Module, directory: Path, writer: ModelWriter | None) -> None:
    """The model files of a checkpoint or final model: the caller's writer, else bare safetensors weights."""
    if writer is not None:
        writer(model, directory)
    else:
        save_model(model, str(directory / MODEL_FILE))
    if not (directory / MODEL_FILE).is_file():
        raise RuntimeError(f"the model-files writer did not write {MODEL_FILE} into {directory}")


def save_training_checkpoint(
    out_dir: Path,
    state: TrainerState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    *,
    keep_last: int,
    write_model_files: ModelWriter | None = None,
) -> Path:
    """Write the checkpoint for `state.step`, point LATEST at it, then drop all but the newest `keep_last`."""
    tmp, final = begin_checkpoint(out_dir, state.step, keep_last)
    write_model(model, tmp, write_model_files)
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    save_file(_rng_tensors(), str(tmp / RNG_FILE))
    trainer = {
        "state": asdict(state),
        "loader": loader.state_dict(),
        "optimizer": opt_meta,
        "rng": _host_rng_state(),
    }
    (tmp / STATE_FILE).write_text(json.dumps(trainer), encoding="utf-8")
    publish_checkpoint(out_dir, tmp, final, keep_last)
    logger.info("saved training checkpoint %s", final)
    return final


def load_latest_training_checkpoint(
    out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
) -> TrainerState | None:
    """Restore model, optimizer, loader and every RNG from the newest complete checkpoint; None if there is none."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        _remove_partial(root)
    found = list_checkpoints(out_dir)
    if not found:
        return None
    step, path = found[-1]
    trainer = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    device = next(model.parameters()).device
    load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    _load_optimizer(optimizer, load_file(str(path / OPTIMIZER_FILE)), trainer["optimizer"])
    loader.load_state_dict(trainer["loader"])
    _restore_rng(load_file(str(path / RNG_FILE)), trainer["rng"])
    state = TrainerState(**trainer["state"])
    if state.step != step:
        raise ValueError(f"{path / STATE_FILE} records step {state.step}, but the directory is for step {step}")
    logger.info("resuming from %s (step %d)", path, step)
    return state
