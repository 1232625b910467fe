"""Run directories, stage manifests, fingerprints, and the skip / re-run / resume decision.

`runs/<name>/<stage>/manifest.json` records what a stage was asked to do (its config and the fingerprints of its
inputs), what it produced (files, sizes), what it measured (metrics) and how it ended (status, timings).

A stage's fingerprint hashes its own settings together with the fingerprints of the stages it reads from and of
any source files, so a changed setting invalidates that stage and everything downstream, while an unchanged one is
skipped. A stage found `running` or `failed` with the same fingerprint is resumed: its function runs again in the
same directory and picks up whatever it had finished (the training loop restarts from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmforge import __version__
from lmforge.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def fingerprint(obj: Any) -> str:
    """A stable short hash of any JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_fingerprint(paths: list[Path], root: Path | None = None) -> str:
    """Fingerprint source files by name, size and modification time (what `make` trusts), cheap on large corpora."""
    entries = []
    for p in sorted(paths):
        st = p.stat()
        name = str(p.relative_to(root)) if root else str(p)
        entries.append((name, st.st_size, st.st_mtime_ns))
    return fingerprint(entries)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s is unreadable; the stage will run again", path)
        return None


def list_outputs(stage_dir: Path) -> list[dict]:
    """Every file a stage left, with its size: the manifest's inventory."""
    out = []
    for p in sorted(stage_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name:
            out.append({"path": str(p.relative_to(stage_dir)), "bytes": p.stat().st_size})
    return out


@dataclass
class StageOutcome:
    stage: str
    action: str  # "skipped" | "ran" | "resumed" | "re-ran"
    metrics: dict
    seconds: float
    fingerprint: str


def run_stage(
    stage: str,
    stage_dir: Path,
    config: dict,
    inputs: dict[str, str],
    fn: Callable[[Path], dict],
) -> StageOutcome:
    """Run `fn(stage_dir)` unless a finished manifest with the same fingerprint says it is up to date.

    `config` is the stage's own settings, `inputs` maps each input (an upstream stage or a source) to its
    fingerprint. `fn` returns the stage's metrics.
    """
    fp = fingerprint({"stage": stage, "config": config, "inputs": inputs})
    old = read_manifest(stage_dir)
    if old and old.get("fingerprint") == fp and old.get("status") == "done" and _outputs_intact(stage_dir, old):
        log.info("%-9s skipped: up to date (fingerprint %s)", stage, fp)
        return StageOutcome(stage, "skipped", old.get("metrics", {}), 0.0, fp)

    if old and old.get("fingerprint") == fp:
        action = "resumed"
        log.info("%-9s resuming an unfinished run in %s", stage, stage_dir)
    elif old:
        action = "re-ran"
        changed = _changed_keys(old.get("config", {}), config) or sorted(
            k for k in inputs if old.get("inputs", {}).get(k) != inputs[k]
        )
        log.info("%-9s re-running: changed %s", stage, ", ".join(changed) or "inputs")
        shutil.rmtree(stage_dir)
    else:
        action = "ran"
    stage_dir.mkdir(parents=True, exist_ok=True)

    manifest = {
        "stage": stage,
        "status": "running",
        "fingerprint": fp,
        "lmforge_version": __version__,
        "config": config,
        "inputs": inputs,
        "outputs": [],
        "metrics": {},
        "timings": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    atomic_write_json(stage_dir / MANIFEST, manifest)
    t0 = time.perf_counter()
    try:
        metrics = fn(stage_dir)
    except BaseException as e:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(e).__name__}: {e}"
        manifest["timings"]["seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(stage_dir / MANIFEST, manifest)
        raise
    seconds = time.perf_counter() - t0
    manifest.update(status="done", outputs=list_outputs(stage_dir), metrics=metrics)
    manifest["timings"].update(
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(seconds, 3), peak_rss_mb=peak_rss_mb()
    )
    atomic_write_json(stage_dir / MANIFEST, manifest)
    log.info("%-9s done in %.1fs", stage, seconds)
    return StageOutcome(stage, action, metrics, seconds, fp)


def _outputs_intact(stage_dir: Path, manifest: dict) -> bool:
    for entry in manifest.get("outputs", []):
        p = stage_dir / entry["path"]
        if not p.exists() or p.stat().st_size != entry["bytes"]:
            log.info("%s changed on disk since the stage finished; running it again", p)
            return False
    return True


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        out: list[str] = []
        for k in keys:
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if old != new else []
