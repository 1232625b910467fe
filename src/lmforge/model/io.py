"""The model checkpoint every later stage reads: a directory of plain files, never a pickle.

    model.safetensors   weights (a tied lm_head is stored once)
    model.json          {"args": ModelArgs.to_dict(), "format": 1}
    tokenizer.json      the tokenizer the model was trained with
    tokenizer_config.json, special_tokens_map.json, generation_config.json, chat_template.jinja
                        an imported model's: its special tokens, stop ids and chat template (where it has them;
                        lmforge.tokenizer_files)
    prefix/             optional: a tuned key/value prefix (lmforge.model.prefix), attached on load

Directories are written into a staging sibling and renamed into place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from lmforge.io import staged_dir
from lmforge.model.prefix import load_prefix
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.hub import HUB_ID, resolve_model_dir
from lmforge.model.hf_import import hf_model_args, load_hf_model
from lmforge.tokenizer_files import TOKENIZER_FILES

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
WEIGHTS = "model.safetensors"
META = "model.json"
TOKENIZER = "tokenizer.json"
HF_CONFIG = "config.json"
PREFIX_DIR = "prefix"


def write_model_files(model: Transformer, args: ModelArgs, dir: Path, tokenizer_path: Path | None) -> None:
    """Write the checkpoint files into an existing directory (normally a staging one)."""
    dir = Path(dir)
    # force_contiguous: an imported GPT-2's Conv1D weights are transposed views (lmforge.model.hf_import).
    st_save_model(model, str(dir / WEIGHTS), metadata={"format": "pt"}, force_contiguous=True)
    (dir / META).write_text(json.dumps({"args": args.to_dict(), "format": FORMAT}, indent=2), encoding="utf-8")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, dir / TOKENIZER)
        for name in TOKENIZER_FILES[1:]:  # an imported tokenizer's other files travel with it
            if (Path(tokenizer_path).parent / name).is_file():
                shutil.copyfile(Path(tokenizer_path).parent / name, dir / name)


def save_model(dir: Path, model: Transformer, args: ModelArgs, tokenizer_path: Path | None = None) -> Path:
    """Write a checkpoint directory atomically, replacing an older one at the same path."""
    dir = Path(dir)
    with staged_dir(dir) as tmp:
        write_model_files(model, args, tmp, tokenizer_path)
    log.info("saved model checkpoint to %s", dir)
    return dir


def _checkpoints_inside(dir: Path) -> list[Path]:
    """The checkpoints a run folder (runs/NAME: */final) or a stage folder (runs/NAME/pretrain: final) holds,
    the newest first (fine-tuned after pre-trained)."""
    found = [d for d in [dir / "final", *sorted(dir.glob("*/final"))] if (d / META).is_file()]
    return sorted(found, key=lambda d: (d / META).stat().st_mtime, reverse=True)


def not_a_checkpoint(dir: Path) -> FileNotFoundError:
    """Why `dir` is no model directory, naming the checkpoint the user probably meant."""
    dir = Path(dir)
    if not dir.exists():
        return FileNotFoundError(f"checkpoint {dir} does not exist")
    inside = _checkpoints_inside(dir) if dir.is_dir() else []
    if inside:
        others = f" (the newest; also {', '.join(map(str, inside[1:]))})" if len(inside) > 1 else ""
        return FileNotFoundError(f"{dir} is not a model checkpoint but holds one: give {inside[0]}{others}")
    return FileNotFoundError(f"{dir} is neither an lmforge checkpoint ({META}) nor a Hugging Face model directory "
                             f"({HF_CONFIG})")  # fmt: skip


def is_hf_model_dir(dir: Path) -> bool:
    """A Hugging Face model directory (config.json, no model.json), which every loader imports on the fly."""
    return (Path(dir) / HF_CONFIG).is_file() and not (Path(dir) / META).is_file()


def require_checkpoint(dir: Path | str) -> Path:
    """The model directory `dir` names: an lmforge checkpoint (model.json), or a Hugging Face model directory
    (config.json), given as a path or as a hub id already in the local cache (lmforge.hub). Anything else raises
    `not_a_checkpoint`'s error. Verbs call it before they create their output folder."""
    try:
        path = resolve_model_dir(dir)
    except FileNotFoundError:
        if HUB_ID.match(str(dir)):
            raise
        raise not_a_checkpoint(Path(dir)) from None
    if not (path / META).is_file() and not (path / HF_CONFIG).is_file():
        raise not_a_checkpoint(path)
    return path


def _require(dir: Path, name: str) -> Path:
    path = require_checkpoint(dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{dir} is not a complete model directory: missing {name}")
    return path


def read_model_args(dir: Path | str) -> ModelArgs:
    """The ModelArgs recorded in a checkpoint's model.json, or those of a Hugging Face model's config.json."""
    dir = require_checkpoint(dir)
    if is_hf_model_dir(dir):
        return hf_model_args(json.loads((dir / HF_CONFIG).read_text(encoding="utf-8")), dir / HF_CONFIG)
    meta = json.loads(_require(dir, META).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{dir / META} has format {meta.get('format')!r}; this lmforge reads format {FORMAT}")
    return ModelArgs.from_dict(meta["args"])


def has_prefix(dir: Path) -> bool:
    """Whether a checkpoint carries a tuned prefix (prefix tuning cannot merge into the weights)."""
    return (Path(dir) / PREFIX_DIR / "prefix.json").is_file()


def load_model(
    dir: Path | str, device: str | torch.device = "cpu", *, prefix: bool = True, dtype: torch.dtype | None = None
) -> tuple[Transformer, ModelArgs]:
    """Rebuild the model of a checkpoint, or import a Hugging Face model directory (lmforge.model.hf_import),
    weights loaded strictly (no unpickling) in their stored dtype unless `dtype` asks for another. A prefix-tuned
    checkpoint's prefix is attached (frozen) unless `prefix=False` asks for the bare base model."""
    dir = require_checkpoint(dir)
    if is_hf_model_dir(dir):
        return load_hf_model(dir, device, dtype)
    args = read_model_args(dir)
    weights = _require(dir, WEIGHTS)
    with torch.device(device):
        model = Transformer(args)
    model.to(dtype or stored_dtype(weights))  # a no-op for the usual fp32 checkpoint
    st_load_model(model, str(weights), strict=True, device=str(device))
    if prefix and has_prefix(dir):
        load_prefix(model, dir / PREFIX_DIR)
    return model, args


def stored_dtype(weights: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (an imported bf16 model stays bf16)."""
    with safe_open(str(weights), framework="pt") as f:
        return f.get_slice(next(iter(f.keys())))[0:1].dtype


def load_checkpoint_tokenizer(dir: Path | str) -> Tokenizer:
    """The tokenizer of a checkpoint or model directory (lmforge's own, or a model's with its special tokens and
    chat template)."""
    from lmforge.tokenizer import Tokenizer

    dir = require_checkpoint(dir)
    _require(dir, TOKENIZER)
    return Tokenizer.from_dir(dir)
