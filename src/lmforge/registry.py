"""The stage registry: every stage of the lifecycle is declared once, in its own package, as a `Stage`.

A declaration names the stage, the recipe sections it owns (pydantic schemas living beside its code), the
artifacts it reads and produces, the settings that invalidate it, the function that runs it, how it renders its
section of the report, and optionally its command-line verb. `lmforge run` (lmforge.pipeline), the recipe schema
(lmforge.recipe), the report and the CLI all read the registry, so adding a stage is one new module that calls
`register(Stage(...))` plus its line in `BUILTIN` (or, from outside lmforge, an entry point in the
`lmforge.stages` group, or a plain `register` call before the recipe is loaded).

Stages talk only through artifacts. A stage `needs` artifacts by name ("model"), taken from the latest stage
before it in the recipe that produces one (or, when the recipe has none, from the earliest registered producer:
the base every later one derives from), or pinned to a stage ("pretrain.model"). An optional need ends with "?"
("preferences?"): it is read only from a stage of the recipe that produces it (the reward stage trains on the
judge stage's labels when the recipe has one), and is absent otherwise.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)

# The modules declaring lmforge's own stages, imported once on the first look-up. One line per new module.
BUILTIN = (
    "lmforge.data.stages",
    "lmforge.pretrain",
    "lmforge.importing",
    "lmforge.finetune.stage",
    "lmforge.label.pairs_stage",
    "lmforge.align.reward_stage",
    "lmforge.align.dpo_stage",
    "lmforge.align.ppo_stage",
    "lmforge.align.grpo_stage",
    "lmforge.judge.stage",
    "lmforge.align.cai_stage",
    "lmforge.eval.run",
    "lmforge.hf",
    "lmforge.report.report",
)
ENTRY_POINT_GROUP = "lmforge.stages"  # third-party packages: an entry point naming a module that registers stages


class StageError(ValueError):
    """A stage declaration that cannot work, or a stage the run cannot feed; the message says what to change."""


@dataclass(frozen=True)
class StageContext:
    """What a stage's function gets: its folder, the settings, and where each artifact it needs lies.

    `settings` is a validated recipe (attribute access to every section). `inputs` maps artifact names to paths:
    from the run directory under `lmforge run`, from the command line's arguments under a verb. `root` is the run
    directory, or None under a verb."""

    out: Path
    settings: Any
    inputs: Mapping[str, Path] = field(default_factory=dict)
    root: Path | None = None
    stage: str = ""

    def input(self, artifact: str) -> Path:
        """The path of a needed artifact; a clear error when this run has none."""
        if artifact not in self.inputs:
            raise StageError(f"stage '{self.stage}' needs the artifact '{artifact}', and this run gives none "
                             f"(it has: {', '.join(sorted(self.inputs)) or 'nothing'})")  # fmt: skip
        return self.inputs[artifact]


@dataclass(frozen=True)
class ReportContext:
    """What a stage's report renderer gets: its folder in the run, its manifest, the run directory (where
    report.md is written), and the folder for the report's images (`out`, linked relative to `root`)."""

    stage_dir: Path
    manifest: dict
    root: Path
    out: Path

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


Renderer = Callable[[ReportContext], list[str]]


@dataclass(frozen=True)
class Stage:
    """One stage of the lifecycle. Only `name`, `order` and `run` are required."""

    name: str
    order: int  # its place in the lifecycle: a recipe lists its stages in this order
    run: Callable[[StageContext], dict]  # does the work in ctx.out; returns the metrics its manifest keeps
    sections: Mapping[str, type[BaseModel]] = field(default_factory=dict)  # recipe sections it owns
    # The sections whose settings invalidate its output (a changed one re-runs it); None: the sections it owns.
    fingerprinted: tuple[str, ...] | None = None
    # artifacts it reads: "model", or pinned to a stage, "pretrain.model"; optional (only from the recipe) "name?"
    needs: tuple[str, ...] = ()
    produces: Mapping[str, str] = field(default_factory=dict)  # artifact -> path inside its folder
    report: Renderer | None = None  # its section of report.md
    headline: Renderer | None = None  # lines at the top of report.md (the run's main result)
    check: Callable[[Any], None] | None = None  # cross-section checks of a recipe that runs it (raise ValueError)
    config: Callable[[Any], dict] | None = None  # the fingerprinted settings, when more than its sections
    sources: Callable[[Any], dict[str, str]] | None = None  # fingerprints of what it reads from outside the run
    # Part of a recipe that names no stages; or a function of the validated recipe deciding it (a recipe starting
    # from an imported model, model.init_from, trains no tokenizer).
    default: bool | Callable[[Any], bool] = True
    training: bool = False  # under torchrun, every rank runs it (the others run on rank 0 alone)
    covers_run: bool = False  # reads every stage the run directory holds (the report)
    verb: Callable[..., None] | None = None  # its `lmforge NAME` command (a typer function), if it has one


_STAGES: dict[str, Stage] = {}
_loaded = False
_version = 0  # bumped on every change, so the recipe schema built from the registry is rebuilt


def register(stage: Stage) -> Stage:
    """Add a stage; a second stage under a taken name, order or section is refused (the order places it in every
    recipe, so two stages at one order would have no defined sequence)."""
    for other in _STAGES.values():
        if other.name == stage.name:
            raise StageError(f"a stage named '{stage.name}' is already registered (by {other.run.__module__})")
        if other.order == stage.order:
            raise StageError(f"stage '{stage.name}' takes order {stage.order}, which stage '{other.name}' already "
                             "has: choose a free one")  # fmt: skip
        taken = set(other.sections) & set(stage.sections)
        if taken:
            raise StageError(f"stage '{stage.name}' declares section(s) {sorted(taken)}, which stage "
                             f"'{other.name}' already owns")  # fmt: skip
    global _version
    _STAGES[stage.name] = stage
    _version += 1
    return stage


def unregister(name: str) -> None:
    global _version
    _STAGES.pop(name, None)
    _version += 1


@contextmanager
def registered(*stages: Stage) -> Iterator[None]:
    """Stages registered for the duration of a block (tests, experiments)."""
    _load()
    for stage in stages:
        register(stage)
    try:
        yield
    finally:
        for stage in stages:
            unregister(stage.name)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not take the built-in stages down with it
            log.warning("stage plug-in %s (%s) did not load: %s", ep.name, ep.value, e)


def version() -> int:
    _load()
    return _version


def all_stages() -> list[Stage]:
    """Every registered stage, in lifecycle order."""
    _load()
    return sorted(_STAGES.values(), key=lambda s: (s.order, s.name))


def names() -> list[str]:
    return [s.name for s in all_stages()]


def get(name: str) -> Stage:
    _load()
    if name not in _STAGES:
        raise StageError(f"no stage named '{name}'; stages: {', '.join(names())}")
    return _STAGES[name]


def section_owners() -> dict[str, Stage]:
    """Recipe section -> the stage whose module declares its schema."""
    return {section: stage for stage in all_stages() for section in stage.sections}


def in_default_recipe(stage: Stage, settings: Any) -> bool:
    """Whether a recipe that names no stages runs `stage`, given its settings."""
    return stage.default(settings) if callable(stage.default) else stage.default


def optional_producer(artifact: str, stage: Stage, recipe_stages: list[str]) -> Stage | None:
    """The stage of the recipe, before `stage`, whose output `stage` reads as `artifact`: the latest producer for a
    plain or optional need ("name?"), None when an optional need has no producer in the recipe."""
    if not artifact.endswith("?"):
        return producer(artifact, stage, recipe_stages)
    name = artifact[:-1]
    in_recipe = [s for s in all_stages() if s.order < stage.order and name in s.produces and s.name in recipe_stages]
    return in_recipe[-1] if in_recipe else None


def producer(artifact: str, stage: Stage, recipe_stages: list[str]) -> Stage:
    """The stage whose output `stage` reads as `artifact` in a recipe with these stages."""
    pinned, _, name = artifact.rpartition(".")
    if pinned:
        source = get(pinned)
        if name not in source.produces:
            raise StageError(f"stage '{stage.name}' needs '{artifact}', but stage '{pinned}' produces only "
                             f"{sorted(source.produces)}")  # fmt: skip
        return source
    earlier = [s for s in all_stages() if s.order < stage.order and name in s.produces]
    if not earlier:
        raise StageError(f"stage '{stage.name}' needs the artifact '{name}', and no stage before it produces one")
    in_recipe = [s for s in earlier if s.name in recipe_stages]
    return in_recipe[-1] if in_recipe else earlier[0]


def artifact_name(artifact: str) -> str:
    """"pretrain.model" -> "model"; "preferences?" -> "preferences"."""
    return artifact.rpartition(".")[2].rstrip("?")


def _sources(stage: Stage, recipe_stages: list[str]) -> Iterator[tuple[str, Stage]]:
    for artifact in stage.needs:
        source = optional_producer(artifact, stage, recipe_stages)
        if source is not None:
            yield artifact_name(artifact), source


def upstream(stage: Stage, recipe_stages: list[str]) -> list[str]:
    """The stages whose output `stage` reads, in the order its `needs` names them, without repeats."""
    return list(dict.fromkeys(source.name for _, source in _sources(stage, recipe_stages)))


def artifact_paths(stage: Stage, recipe_stages: list[str], root: Path) -> dict[str, Path]:
    """Where each artifact `stage` needs lies in the run directory `root` (an optional one without a producer in
    the recipe is left out)."""
    return {name: root / source.name / source.produces[name] for name, source in _sources(stage, recipe_stages)}


__all__ = ["Stage", "StageContext", "ReportContext", "StageError", "register", "unregister", "registered", "get",
           "all_stages", "names", "section_owners", "upstream", "artifact_paths", "producer", "optional_producer",
           "in_default_recipe",
           "BUILTIN"]
