"""Where a model the user names lies on disk: a directory, or a Hugging Face hub id already in the local cache.

lmforge never downloads. A hub id ("Qwen/Qwen2.5-0.5B") that is not a local path is looked up in the cache that
huggingface_hub fills ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), at the revision its
refs/main names (else the newest snapshot); when it is not there, the error gives the command that downloads it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def cached_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot folder of `hub_id`, or None when the cache does not hold it."""
    repo = hub_cache() / f"models--{hub_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text(encoding="utf-8").strip()
        if pinned.is_dir():
            return pinned
    found = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_model_dir(name: str | Path) -> Path:
    """The directory `name` means: itself when it exists, else a cached hub snapshot. A missing one raises
    FileNotFoundError saying how to get it."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if HUB_ID.match(text):
        snapshot = cached_snapshot(text)
        if snapshot is not None:
            return snapshot
        raise FileNotFoundError(
            f"{text!r} is neither a local directory nor in the Hugging Face cache ({hub_cache()}); lmforge never "
            f"downloads. Download it first, e.g. `hf download {text} --local-dir models/{text.split('/')[1]}` "
            "(huggingface_hub's CLI; older versions: `huggingface-cli download`), then pass that directory"
        )
    raise FileNotFoundError(f"model directory {path} does not exist")
