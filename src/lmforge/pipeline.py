"""`lmforge run`: the stages of a recipe, in order, each skipped, re-run or resumed according to its manifest.

Stages talk only through artifacts in the run directory:
curate/{train,val}/part-*.jsonl.zst -> tokenizer/tokenizer.json -> shards/*.bin -> pretrain/final/ -> [sft/final/]
-> eval/results.json, export/hf/ -> report.md. Evaluation scores the pre-trained model; export takes the fine-tuned
one when the recipe has an sft stage (the model a user chats with), else the pre-trained one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import yaml

from lmforge.io import atomic_write_json, atomic_write_text
from lmforge.recipe import Recipe
from lmforge.runs import (
    MANIFEST,
    NON_SEMANTIC,
    StageOutcome,
    files_fingerprint,
    fingerprint,
    read_manifest,
    run_stage,
)

log = logging.getLogger(__name__)

# What each stage reads, by upstream stage name.
UPSTREAM = {
    "curate": [],
    "tokenizer": ["curate"],
    "shards": ["curate", "tokenizer"],
    "pretrain": ["shards", "tokenizer"],
    "sft": ["pretrain", "curate"],
    "eval": ["pretrain", "curate"],
    "export": ["pretrain"],
    "report": ["curate", "tokenizer", "shards", "pretrain", "sft", "eval", "export"],
}
RUN_RECORD = "run.json"  # the recipe that made a run directory: no other recipe writes into it


class RunDirError(ValueError):
    """A run directory this recipe must not write into; the message says whose it is and what to do."""


def _settings(recipe: Recipe, section: str) -> dict:
    data = getattr(recipe, section).model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in NON_SEMANTIC.get(section, set())}


def stage_config(recipe: Recipe, stage: str) -> dict:
    """The settings a stage's fingerprint covers."""
    if stage == "curate":
        return _settings(recipe, "data")
    if stage == "pretrain":
        return {"model": _settings(recipe, "model"), "train": _settings(recipe, "train"),
                "pretrain": _settings(recipe, "pretrain")}
    if stage == "sft":
        cfg = _settings(recipe, "sft")
        cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in NON_SEMANTIC["train"]}
        return cfg
    if stage == "eval":
        return _settings(recipe, "eval")
    if stage == "export":
        return {**_settings(recipe, "export"), "model": _export_source(recipe)}
    if stage in ("tokenizer", "shards"):
        return _settings(recipe, stage)
    return {"stages": list(recipe.stages)}


def source_fingerprint(recipe: Recipe) -> str:
    """Fingerprint of the raw corpus: names, sizes and mtimes of its files."""
    from lmforge.data.readers import stdlib_root, stdlib_source_files

    if recipe.data.source == "stdlib":
        return files_fingerprint(stdlib_source_files(recipe.data.include_tests), stdlib_root())
    src = Path(recipe.data.source)
    if not src.exists():
        raise FileNotFoundError(f"data.source {src} does not exist; give a file or directory of text, or 'stdlib'")
    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    return files_fingerprint(files, None if src.is_file() else src)


def _export_source(recipe: Recipe) -> str:
    """The stage whose final model is exported: the fine-tuned one when the recipe fine-tunes."""
    return "sft" if "sft" in recipe.stages else "pretrain"


def upstream(recipe: Recipe, stage: str) -> list[str]:
    """The stages whose output `stage` reads in this recipe."""
    return [_export_source(recipe)] if stage == "export" else UPSTREAM[stage]


def existing_stages(root: Path) -> list[str]:
    """The stages a run directory holds (those with a manifest), in lifecycle order: what a report covers."""
    return [s for s in UPSTREAM["report"] if (root / s / MANIFEST).is_file()]


def _stage_fn(recipe: Recipe, stage: str, root: Path) -> Callable[[Path], dict]:
    """Bind a stage's plain function to the run directory's artifacts."""
    tok_path = root / "tokenizer" / "tokenizer.json"
    if stage == "curate":
        from lmforge.data.curate import run_curate

        return lambda out: run_curate(recipe.data, out)
    if stage == "tokenizer":
        from lmforge.tokenizer import run_tokenizer

        return lambda out: run_tokenizer(root / "curate", recipe.tokenizer, out)
    if stage == "shards":
        from lmforge.data.shards import run_shards

        return lambda out: run_shards(root / "curate", tok_path, recipe.shards, out)
    if stage == "pretrain":
        from lmforge.pretrain import pretrain

        return lambda out: pretrain(root / "shards", tok_path, recipe.model, recipe.train, out, recipe.pretrain,
                                    recipe.parallel)
    if stage == "sft":
        from lmforge.finetune.stage import run_sft_stage

        return lambda out: run_sft_stage(root, recipe.sft, out, recipe.parallel)
    if stage == "eval":
        from lmforge.eval.run import evaluate_checkpoint

        return lambda out: evaluate_checkpoint(root / "pretrain" / "final", root / "curate" / "val", recipe.eval, out,
                                               device=recipe.train.device, training_data=root / "curate")  # fmt: skip
    if stage == "export":
        from lmforge.hf import export_hf

        def export(out: Path) -> dict:
            path = export_hf(root / _export_source(recipe) / "final", out / "hf", dtype=recipe.export.dtype)
            return {"path": str(path), "bytes": sum(p.stat().st_size for p in path.iterdir())}

        return export
    if stage == "report":
        from lmforge.report.report import build_report

        return lambda out: build_report(root, existing_stages(root), out)
    raise ValueError(f"unknown stage {stage!r}")


def run_recipe(recipe: Recipe) -> list[StageOutcome]:
    """Run the recipe's stages in order in `run_dir/name/`; returns what happened to each.

    Under torchrun, rank 0 runs every stage and the other ranks join it for the training stage (see
    `_DistributedStages`); they return an empty list.
    """
    from lmforge.train.distributed import launched_world_size

    check_run_dir(recipe)  # on every rank, before any of them starts
    if launched_world_size() > 1:
        return _DistributedStages(recipe).run()
    root = _start_run_dir(recipe)
    fps: dict[str, str] = {}
    outcomes = []
    for i, stage in enumerate(recipe.stages, 1):
        log.info("stage %d/%d: %s", i, len(recipe.stages), stage)
        outcome = run_stage(stage, root / stage, stage_config(recipe, stage), _stage_inputs(recipe, stage, fps),
                            _stage_fn(recipe, stage, root))  # fmt: skip
        fps[stage] = outcome.fingerprint
        outcomes.append(outcome)
    return outcomes


def check_run_dir(recipe: Recipe) -> None:
    """Refuse a run directory that another recipe made (this one would overwrite its stages), or a folder with
    files that is not a run directory at all. Raises RunDirError."""
    root = recipe.run_path
    record_path = root / RUN_RECORD
    if not record_path.is_file():
        if root.is_dir() and any(root.iterdir()) and not (root / "recipe.yaml").is_file():
            raise RunDirError(f"{root} is not empty and is not a run directory (it has no {RUN_RECORD} or "
                              "recipe.yaml); `lmforge run` would write its stage folders into it: give the recipe "
                              "another name (name=NEW) or run_dir, or move those files away")  # fmt: skip
        return  # a new run directory, or one made before run directories recorded their recipe
    made_by = json.loads(record_path.read_text(encoding="utf-8")).get("recipe")
    if recipe.origin in (made_by, str((root / "recipe.yaml").resolve())):  # its own recipe.yaml re-runs it
        return
    raise RunDirError(
        f"{root} holds the run of {made_by}, and this is {recipe.origin}: running it there would overwrite that "
        f"run's stages. Give this recipe a name of its own (name: in the file, or name=NEW on the command line), "
        f"or delete {root} to start over"
    )


def _start_run_dir(recipe: Recipe) -> Path:
    """Create the run directory, recording the recipe that made it (once) and every setting this run uses."""
    root = recipe.run_path
    root.mkdir(parents=True, exist_ok=True)
    if not (root / RUN_RECORD).is_file():
        atomic_write_json(root / RUN_RECORD, {"recipe": recipe.origin, "name": recipe.name})
    header = (f"# Every setting of run {recipe.name}: its recipe, bases and overrides, with the defaults filled in.\n"
              f"# `lmforge run {root / 'recipe.yaml'}` runs it again.\n")  # fmt: skip
    atomic_write_text(root / "recipe.yaml", header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return root


def _stage_inputs(recipe: Recipe, stage: str, fps: dict[str, str]) -> dict[str, str]:
    """The fingerprints of a stage's inputs: its source, and the upstream stages run now or earlier."""
    root = recipe.run_path
    inputs = {}
    if stage == "curate":
        inputs["source"] = source_fingerprint(recipe)
    for up in upstream(recipe, stage):
        if up in fps:
            inputs[up] = fps[up]
            continue
        manifest = read_manifest(root / up)
        if manifest is None or manifest.get("status") != "done":
            if stage == "report":
                continue  # the report covers whatever stages exist
            raise RuntimeError(
                f"stage '{stage}' reads the output of '{up}', which has not finished in {root}; "
                f"add '{up}' to the recipe's stages or run it first"
            )
        inputs[up] = manifest["fingerprint"]
    return inputs


class _DistributedStages:
    """A whole recipe under torchrun: rank 0 runs the data, evaluation and report stages alone while the other
    ranks wait; every rank trains. Rank 0 also keeps the run's bookkeeping (fingerprints, manifests) and tells
    the others whether the training stage runs or is up to date. The waits use a gloo group without a practical
    timeout, since curating a large corpus may take hours; a rank that dies still ends the wait at once."""

    TRAINING = ("pretrain", "sft")

    def __init__(self, recipe: Recipe) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        from lmforge.train.distributed import init_world

        self.recipe, self.dist = recipe, dist
        self.world = init_world(recipe.parallel, recipe.train.device)
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=7))

    def _tell(self, message: str | None = None) -> str:
        box = [message]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return str(box[0])

    def run(self) -> list[StageOutcome]:
        recipe, root, main = self.recipe, self.recipe.run_path, self.world.is_main
        if main:
            _start_run_dir(recipe)
        fps: dict[str, str] = {}
        outcomes = []
        for stage in recipe.stages:
            fn = _stage_fn(recipe, stage, root)
            if not main:
                if stage in self.TRAINING and self._tell() == "run":
                    fn(root / stage)
                self.dist.barrier(group=self.group)
                continue
            started = False
            if stage in self.TRAINING:

                def fn(out: Path, train=fn) -> dict:  # noqa: ANN001 - binds the stage function
                    nonlocal started
                    started = True
                    self._tell("run")
                    return train(out)

            outcome = run_stage(stage, root / stage, stage_config(recipe, stage), _stage_inputs(recipe, stage, fps), fn)
            if stage in self.TRAINING and not started:
                self._tell("skip")
            self.dist.barrier(group=self.group)
            fps[stage] = outcome.fingerprint
            outcomes.append(outcome)
        return outcomes


__all__ = ["run_recipe", "check_run_dir", "RunDirError", "stage_config", "source_fingerprint", "existing_stages",
           "fingerprint"]
