"""The run report: one Markdown page, assembled from the sections each stage renders from its own manifest.

The page is: the headline of every stage that has one (the eval stage's bits per byte), a table of every stage's
status, time and memory, then each stage's section in lifecycle order (`Stage.report` in lmforge.registry). The
report reads only what the stages left on disk, so `lmforge report` rebuilds it at any time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from lmforge import verbs
from lmforge.io import atomic_write_text
from lmforge.registry import ReportContext, Stage, StageContext, all_stages, register
from lmforge.report.format import fmt
from lmforge.runs import MANIFEST, read_manifest

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"


def existing_stages(root: Path) -> list[str]:
    """The registered stages a run directory holds (those with a manifest), in lifecycle order: what a report
    covers."""
    return [s.name for s in all_stages() if (Path(root) / s.name / MANIFEST).is_file()]


def _stage_table(contexts: list[tuple[Stage, ReportContext]]) -> list[str]:
    lines = ["| stage | status | seconds | peak memory (MB) | fingerprint |", "|---|---|---:|---:|---|"]
    for stage, ctx in contexts:
        m = ctx.manifest
        t = m.get("timings", {})
        lines.append(f"| {stage.name} | {m.get('status', 'not run')} | {fmt(t.get('seconds'), '.1f')} | "
                     f"{fmt(t.get('peak_rss_mb'), '.0f')} | `{m.get('fingerprint', '')}` |")  # fmt: skip
    return lines


def build_report(run_path: Path, stages: list[str], out_dir: Path) -> dict:
    """Write `run_path/report.md` (with its images in `out_dir`) from the manifests of `stages`; returns the
    report's path and the sections it holds."""
    if not stages:
        raise FileNotFoundError(
            f"{run_path} is not a run directory: a run directory, made by `lmforge run`, holds a recipe.yaml and a "
            "folder per stage (curate/, tokenizer/, shards/, pretrain/, ...) with a manifest.json, and there is no "
            "stage there to report on"
        )
    run_path = Path(run_path)
    contexts = [(s, ReportContext(run_path / s.name, read_manifest(run_path / s.name) or {}, run_path, out_dir))
                for s in all_stages() if s.name in stages]  # fmt: skip
    total_s = sum(ctx.manifest.get("timings", {}).get("seconds", 0.0) for _, ctx in contexts)
    lines = [f"# Run report: {run_path.name}", ""]
    for stage, ctx in contexts:
        if stage.headline is not None and ctx.metrics:
            lines += stage.headline(ctx)
    lines += ["## Stages", "", *_stage_table(contexts), "", f"Total stage time: {total_s:.1f} s.", ""]
    sections = []
    for stage, ctx in contexts:
        if stage.report is not None and ctx.metrics:
            part = stage.report(ctx)
            lines += part
            if part:
                sections.append(stage.name)
    atomic_write_text(run_path / REPORT_FILE, "\n".join(lines) + "\n")
    log.info("report written to %s", run_path / REPORT_FILE)
    return {"report": str(run_path / REPORT_FILE), "sections": sections}


def _report_stage(ctx: StageContext) -> dict:
    assert ctx.root is not None, "the report covers a run directory"
    return build_report(ctx.root, existing_stages(ctx.root), ctx.out)


def report_verb(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/stdlib-code.")) -> None:
    """Rebuild run_dir/report.md from the manifests the stages left."""
    try:
        verbs.run_stage(REPORT_STAGE, None, run_dir / "report", root=run_dir)
    except FileNotFoundError as e:  # not a run directory
        verbs.fail(str(e))


# The last stage: it reads whatever stages the run directory holds.
REPORT_STAGE = register(Stage(name="report", order=90, run=_report_stage, covers_run=True, verb=report_verb,
                              config=lambda settings: {"stages": list(settings.stages)}))  # fmt: skip
