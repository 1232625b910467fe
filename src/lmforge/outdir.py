"""Output folders: a verb writes only into a new or empty folder, or one lmforge wrote; a training verb resumes
only the job its folder already holds.

Every verb's output folder goes through `claim_output_dir`. A folder lmforge wrote carries a small `.lmforge`
marker (JSON: the verb, the lmforge version and, for a training job, its fingerprint, settings and inputs); a
`lmforge run` stage folder is recognised by its manifest.json. A non-empty folder with neither is refused, naming
a few of its files, because the verb would overwrite or delete them. A folder another verb wrote is refused too.

`start_job` (pretrain, sft, sft --task classify, embed --finetune-steps) fingerprints a job's settings and inputs
the way `lmforge run` fingerprints a stage (lmforge.runs). The same job picks up where it left off; a different
one starts over, with a warning naming what changed, after removing the outputs that verb writes (and nothing
else: a file of the user's in the folder stays).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.io import atomic_write_json
from lmforge.runs import MANIFEST, _changed_keys, files_fingerprint, fingerprint, read_manifest

log = logging.getLogger(__name__)

MARKER = ".lmforge"
SHOWN = 3  # foreign files named in a refusal


class OutputDirError(ValueError):
    """An output folder lmforge must not write into; the message says why and what to do."""


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The `.lmforge` marker of a folder lmforge wrote, or None."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # lmforge's own name, unreadable: still lmforge's folder, with no record of its job
    return marker if isinstance(marker, dict) else {}


def _owner(directory: Path, marker: dict[str, Any] | None) -> str | None:
    """The verb that wrote `directory` (from its `marker` or its run manifest), "" for an unreadable marker."""
    if marker is not None:
        return str(marker.get("verb", ""))
    manifest = read_manifest(directory) if (directory / MANIFEST).is_file() else None
    return str(manifest.get("stage", "")) if manifest else None


def _listing(directory: Path, names: Sequence[str]) -> str:
    shown = ", ".join(f"{n}/" if (directory / n).is_dir() else n for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def claim_output_dir(directory: Path, verb: str, *, replaces: Collection[str] | None = None) -> dict[str, Any]:
    """Check that `lmforge VERB` may write into `directory`, create it and mark it as lmforge's.

    `replaces`: the names the verb writes when it replaces the whole folder (export); then every entry must be one
    of them, marker or not. Returns the marker found ({} for a new folder). Raises OutputDirError otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"{directory} is a file; `lmforge {verb}` writes a folder: give it a folder name")
    entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    marker = read_marker(directory)
    owner = _owner(directory, marker)
    if replaces is not None:
        foreign = [n for n in entries if n not in replaces and n != MARKER]
        if foreign:
            raise OutputDirError(
                f"{directory} holds files `lmforge {verb}` did not write ({_listing(directory, foreign)}); it replaces "
                "the whole folder, so they would be lost: move them away or choose a new or empty folder"
            )
    elif entries and owner is None:
        raise OutputDirError(
            f"{directory} is not empty and lmforge did not write it (it holds {_listing(directory, entries)}); "
            f"`lmforge {verb}` could overwrite or delete what is there, so it writes only into a new or empty folder "
            f"or one it wrote before (marked by {MARKER}): choose another folder, or move those files away"
        )
    if owner and owner != verb:
        raise OutputDirError(f"{directory} holds the output of `lmforge {owner}`; give `lmforge {verb}` a folder of "
                             "its own (a new or empty one)")  # fmt: skip
    if marker is None:
        write_marker(directory, verb)
    return marker or {}


@contextmanager
def claimed_output_dir(directory: Path, verb: str) -> Iterator[dict[str, Any]]:
    """`claim_output_dir` around a verb's work: a folder the claim created is removed again when the verb fails
    before writing anything into it, so a mistyped input leaves no empty folder behind."""
    directory = Path(directory)
    created = not directory.exists()
    marker = claim_output_dir(directory, verb)
    try:
        yield marker
    except BaseException:
        if created and directory.is_dir() and [p.name for p in directory.iterdir()] == [MARKER]:
            shutil.rmtree(directory)
        raise


def write_marker(directory: Path, verb: str, job: dict[str, Any] | None = None) -> None:
    """Mark `directory` as written by `lmforge VERB` (creating it), with the training job it holds if any."""
    marker: dict[str, Any] = {"verb": verb, "lmforge_version": __version__}
    if job is not None:
        marker["job"] = job
    atomic_write_json(Path(directory) / MARKER, marker)


def claim_output_file(path: Path, companion: str) -> None:
    """Check that a verb writing the file `path` (and `path` + `companion` beside it) may replace what is there:
    an existing `path` without its companion is not lmforge's. Raises OutputDirError."""
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{path} is a folder; give a file name")
    if path.exists() and not path.with_name(path.name + companion).exists():
        raise OutputDirError(f"{path} already exists and lmforge did not write it (there is no {path.name}{companion} "
                             "beside it); choose another file name, or move it away")  # fmt: skip


def inputs_fingerprint(path: Path) -> str:
    """A file's, or a folder's files', fingerprint (names relative to it, sizes, modification times); the marker
    and manifest of a folder lmforge wrote do not count."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return files_fingerprint([path], path.parent)
    files = [p for p in path.rglob("*") if p.is_file() and p.name not in (MARKER, MANIFEST)]
    return files_fingerprint(files, path)


def start_job(
    directory: Path,
    verb: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    outputs: Sequence[str],
    world: Any = None,
) -> str:
    """Prepare `directory` for a training job: "ran" (new), "resumed" (the same job) or "re-ran" (a different job
    was there: its `outputs`, the names this verb writes, were removed). Under torchrun (`world`, from
    init_world) rank 0 decides and the others wait for it."""
    action = ""
    if world is None or world.is_main:
        action = _prepare(Path(directory), verb, config, inputs, outputs)
    if world is not None and world.distributed:
        import torch.distributed as dist

        from lmforge.train.distributed import collective_errors

        with collective_errors("preparing the output folder", world):
            box = [action]
            dist.broadcast_object_list(box, src=0)
            action = str(box[0])
    return action


def _prepare(directory: Path, verb: str, config: dict[str, Any], inputs: dict[str, str], outputs: Sequence[str]) -> str:
    marker = claim_output_dir(directory, verb)
    config = json.loads(json.dumps(config, default=str))  # the form it is stored in: tuples are lists
    job = {"fingerprint": fingerprint({"verb": verb, "config": config, "inputs": inputs}), "config": config,
           "inputs": inputs}  # fmt: skip
    old = marker.get("job")
    present = [n for n in outputs if (directory / n).exists()]
    if old and old.get("fingerprint") == job["fingerprint"]:
        log.info("%s: %s holds this same job (same settings and inputs); resuming it where it can", verb, directory)
        action = "resumed"
    elif present:
        changed = _changed_keys(old.get("config", {}), config) if old else []
        changed += [k for k in inputs if old and old.get("inputs", {}).get(k) != inputs[k]]
        what = f"changed: {', '.join(dict.fromkeys(changed))}" if changed else "no record of the settings it ran with"
        log.warning("%s: %s holds a different job (%s); starting over, replacing its %s", verb, directory, what,
                    ", ".join(present))  # fmt: skip
        for name in present:
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        action = "re-ran"
    else:
        action = "ran"
    write_marker(directory, verb, job)
    return action
