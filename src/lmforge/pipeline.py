"""`lmforge run`: the stages of a recipe, in order, each skipped, re-run or resumed according to its manifest.

Stages talk only through artifacts in the run directory, found through the stage registry (lmforge.registry):
each stage reads the artifacts it `needs` from the stage that `produces` them, and its fingerprint covers its
own settings and the fingerprints of those upstream stages, so a changed setting re-runs it and everything after.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from lmforge import registry
from lmforge.io import atomic_write_json, atomic_write_text
from lmforge.recipe import Recipe
from lmforge.registry import Stage, StageContext
from lmforge.runs import StageOutcome, read_manifest, run_stage

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"  # the recipe that made a run directory: no other recipe writes into it


class RunDirError(ValueError):
    """A run directory this recipe must not write into; the message says whose it is and what to do."""


def stage_config(recipe: Recipe, stage: str | Stage) -> dict:
    """The settings a stage's fingerprint covers: what it declares, else its sections' semantic settings (one
    section's flat, several nested by section name)."""
    stage = registry.get(stage) if isinstance(stage, str) else stage
    if stage.config is not None:
        return stage.config(recipe)
    sections = stage.fingerprinted if stage.fingerprinted is not None else tuple(stage.sections)
    if len(sections) == 1:
        return getattr(recipe, sections[0]).semantic()
    return {section: getattr(recipe, section).semantic() for section in sections}


def _context(recipe: Recipe, stage: Stage, root: Path) -> StageContext:
    inputs = registry.artifact_paths(stage, list(recipe.stages), root)
    return StageContext(out=root / stage.name, settings=recipe, inputs=inputs, root=root, stage=stage.name)


def _run_one(recipe: Recipe, stage: Stage, root: Path, fps: dict[str, str], fn=None) -> StageOutcome:
    """Run (or skip, or resume) one stage of the recipe; `fn` replaces its function (the distributed wrapper)."""
    ctx = _context(recipe, stage, root)
    run = fn or stage.run
    return run_stage(stage.name, ctx.out, stage_config(recipe, stage), _stage_inputs(recipe, stage, fps),
                     lambda out: run(ctx))  # fmt: skip


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
    for i, name in enumerate(recipe.stages, 1):
        log.info("stage %d/%d: %s", i, len(recipe.stages), name)
        outcome = _run_one(recipe, registry.get(name), root, fps)
        fps[name] = outcome.fingerprint
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


def _stage_inputs(recipe: Recipe, stage: Stage, fps: dict[str, str]) -> dict[str, str]:
    """The fingerprints of a stage's inputs: its sources outside the run, and the upstream stages run now or
    earlier (a stage that covers the run takes whatever stages the directory holds)."""
    from lmforge.report.report import existing_stages

    root = recipe.run_path
    inputs = dict(stage.sources(recipe)) if stage.sources is not None else {}
    ups = existing_stages(root) if stage.covers_run else registry.upstream(stage, list(recipe.stages))
    for up in ups:
        if up == stage.name:
            continue
        if up in fps:
            inputs[up] = fps[up]
            continue
        manifest = read_manifest(root / up)
        if manifest is None or manifest.get("status") != "done":
            if stage.covers_run:
                continue  # the report covers whatever stages exist
            raise RuntimeError(
                f"stage '{stage.name}' reads the output of '{up}', which has not finished in {root}; "
                f"add '{up}' to the recipe's stages or run it first"
            )
        inputs[up] = manifest["fingerprint"]
    return inputs


class _DistributedStages:
    """A whole recipe under torchrun: rank 0 runs the data, evaluation and report stages alone while the other
    ranks wait; every rank trains. Rank 0 also keeps the run's bookkeeping (fingerprints, manifests) and tells
    the others whether the training stage runs or is up to date. The waits use a gloo group without a practical
    timeout, since curating a large corpus may take hours; a rank that dies still ends the wait at once."""

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
        for name in recipe.stages:
            stage = registry.get(name)
            if not main:
                if stage.training and self._tell() == "run":
                    stage.run(_context(recipe, stage, root))
                self.dist.barrier(group=self.group)
                continue
            started = False

            def fn(ctx: StageContext, stage: Stage = stage) -> dict:
                nonlocal started
                started = True
                if stage.training:
                    self._tell("run")
                return stage.run(ctx)

            outcome = _run_one(recipe, stage, root, fps, fn)
            if stage.training and not started:
                self._tell("skip")
            self.dist.barrier(group=self.group)
            fps[name] = outcome.fingerprint
            outcomes.append(outcome)
        return outcomes


__all__ = ["run_recipe", "check_run_dir", "RunDirError", "stage_config"]
