"""What every `lmforge` verb shares: usage errors, output-folder checks, settings from overrides, Ctrl-C handling,
and running a stage's function on paths given on the command line.

A stage's verb lives beside the stage (its `Stage.verb`, e.g. lmforge.data.stages) and lmforge.cli adds it to the
command; the verb turns its arguments into the stage's settings and inputs and calls `run_stage`, so `lmforge
NAME` and the NAME stage of `lmforge run` run the same function.
"""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from lmforge.recipe import RecipeError, load_recipe, validate_recipe
from lmforge.registry import Stage, StageContext

OVERRIDES_HELP = "Settings as section.key=value (e.g. train.max_steps=200 model.depth=3)."


def fail(message: str, code: int = 1) -> None:
    """End the command with `error: MESSAGE` on standard error (exit 2: a usage error; 1: the work failed)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def resumable(command: Callable[..., None]) -> Callable[..., None]:
    """A verb whose work resumes (run, pretrain, sft): Ctrl-C ends with what was saved and the command that
    continues, which is the same command line. Exits 130, as a shell reports SIGINT."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt as e:  # the training loop's TrainingInterrupted names the checkpoint it saved
            typer.echo(f"{str(e) or 'interrupted'}\nto resume, run the same command again: {shlex.join(sys.argv)}",
                       err=True)  # fmt: skip
            raise typer.Exit(130) from None

    return wrapper


@contextmanager
def output_checked() -> Iterator[None]:
    """A refused output folder or file (lmforge.outdir: not empty and not lmforge's) is a usage error."""
    from lmforge.outdir import OutputDirError

    try:
        yield
    except OutputDirError as e:
        fail(str(e), 2)


@contextmanager
def claimed(out: Path, verb: str) -> Iterator[None]:
    """Check `out` before any work (lmforge writes only into a new, empty or earlier lmforge folder) and remove
    the folder again if the verb fails before writing into it."""
    from lmforge.outdir import claimed_output_dir

    with output_checked(), claimed_output_dir(out, verb):
        yield


def settings(overrides: list[str], allowed: set[str], given: dict | None = None) -> Any:
    """A recipe's settings from `section.key=value` overrides (on top of `given`, settings the verb's own options
    set), for a verb that runs one stage: an override outside `allowed` sections, or a bad key or value, is a usage
    error naming it."""
    for item in overrides:
        section = item.split(".", 1)[0]
        if section not in allowed:
            fail(f"override '{item}': this command takes settings under {sorted(allowed)}", 2)
    try:
        return validate_recipe(given or {}, source="command line", overrides=overrides)
    except RecipeError as e:
        fail(str(e), 2)


def stage_settings(section: str, overrides: list[str] | None, chosen: dict[str, Any], *,
                   section_overrides: bool = False) -> Any:
    """The settings of a verb that runs one training stage: its options (`chosen`; None: not given) as the
    `section`'s settings, `train.*` overrides as `section.train.*` (the stage's own training defaults), `parallel.*`
    as given, and `section.*` overrides too when `section_overrides`. A bad override is named as the user wrote it."""
    overrides = list(overrides or [])
    settings(overrides, {"train", "parallel"} | ({section} if section_overrides else set()))
    moved = [f"{section}.{o}" if o.startswith("train.") else o for o in overrides]
    return settings(moved, {section, "parallel"}, given={section: {k: v for k, v in chosen.items() if v is not None}})


def recipe_settings(recipe: str, overrides: list[str]) -> Any:
    """A recipe's settings (a file or a built-in name) with overrides; a bad one is a usage error."""
    try:
        return load_recipe(recipe, overrides)
    except RecipeError as e:
        fail(str(e), 2)


def run_stage(stage: Stage, config: Any, out: Path, root: Path | None = None, **inputs: Path | None) -> dict:
    """Run a stage's function, the one `lmforge run` calls, on the inputs given on the command line (artifact name
    -> path; None: not given). Returns the stage's metrics."""
    given = {artifact: Path(path) for artifact, path in inputs.items() if path is not None}
    return stage.run(StageContext(out=out, settings=config, inputs=given, root=root, stage=stage.name))
