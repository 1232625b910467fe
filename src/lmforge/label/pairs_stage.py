"""The pairs stage of a recipe and `lmforge pairs`: replies of two or more models (or samples of one) to the same
prompts, written as a candidates file (lmforge.label.candidates) for a judge stage or the labelling app.

The chain it starts: sft -> pairs -> judge (or people, with `lmforge label project create --items`) -> reward or
dpo, which read the labels when their own `data` is unset.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from lmforge import verbs
from lmforge.align.prompts import PromptItem, docstring_prompts, read_prompts
from lmforge.finetune.config import SFTConfig
from lmforge.finetune.stage import docstring_pairs
from lmforge.label.candidates import write_candidates
from lmforge.label.generate import generate_candidates
from lmforge.label.pairs_config import PairsConfig
from lmforge.model.io import load_checkpoint_tokenizer, read_model_args, require_checkpoint
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.registry import ReportContext, Stage, StageContext, register

log = logging.getLogger(__name__)

CANDIDATES = "candidates.jsonl"
SHOWN = 2  # items shown in the report


def pair_prompts(cfg: PairsConfig, checkpoint: Path, curate_dir: Path | None) -> tuple[list[PromptItem], dict]:
    """The prompts to reply to (at most cfg.limit) and what reading them skipped."""
    if cfg.prompts == "docstring_pairs":
        if curate_dir is None:
            raise ValueError("pairs.prompts=docstring_pairs derives its prompts from a run's curated code; give a "
                             "prompts file instead (lmforge pairs CKPT --prompts FILE)")  # fmt: skip
        tok = load_checkpoint_tokenizer(checkpoint)
        sft = SFTConfig(max_pairs=cfg.limit, train={"seq_len": read_model_args(checkpoint).max_seq_len})
        train_pairs, _, counts = docstring_pairs(curate_dir, tok, sft)
        return docstring_prompts(train_pairs)[: cfg.limit], counts
    items, skipped = read_prompts(cfg.prompts, cfg.format, cfg.limit)
    return items, {"skipped_records": skipped.count, "skipped_examples": skipped.examples[:5]}


def model_names(cfg: PairsConfig, name: str, checkpoint: Path) -> dict[str, Path]:
    """Response name -> checkpoint: the run's model and the other checkpoints, or `samples` draws of the model."""
    if cfg.checkpoints:
        if name in cfg.checkpoints:
            raise ValueError(f"pairs.checkpoints names {name!r}, the run's own model: choose another name")
        return {name: checkpoint, **{k: Path(v) for k, v in cfg.checkpoints.items()}}
    return {f"{name}#{i}": checkpoint for i in range(1, cfg.samples + 1)}


def run_pairs(checkpoint: Path, cfg: PairsConfig, out: Path, curate_dir: Path | None = None,
              name: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Write out/candidates.jsonl: replies of `checkpoint` (named `name`; default its folder's name, or the stage's
    for runs/NAME/sft/final: "sft") and of cfg.checkpoints to the prompts; the stage's metrics."""
    checkpoint = require_checkpoint(checkpoint)
    name = name or (checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name)
    models = model_names(cfg, name, checkpoint)
    files = {key: inputs_fingerprint(path) for key, path in models.items()}
    if cfg.prompts != "docstring_pairs":
        files["prompts"] = inputs_fingerprint(Path(cfg.prompts))
    start_job(out, "pairs", cfg.semantic(), files, (CANDIDATES,))
    prompts, read_counts = pair_prompts(cfg, checkpoint, curate_dir)
    if not prompts:
        raise ValueError(f"no usable prompts in {cfg.prompts} ({read_counts})")
    items, skipped = generate_candidates(prompts, models, max_new_tokens=cfg.max_new_tokens,
                                         temperature=cfg.temperature, seed=cfg.seed, device=cfg.device)  # fmt: skip
    write_candidates(out / CANDIDATES, items)
    same = sum(len({r.content for r in item.responses}) == 1 for item in items)
    log.info("pairs: %d items from %d prompts (%d skipped) in %s", len(items), len(prompts), skipped.count, out)
    return {"items": len(items), "prompts": len(prompts), "models": list(models), "identical_replies": same,
            "skipped": skipped.count, "skipped_by_reason": skipped.by_reason, "read": read_counts,
            "examples": [{"prompt": i.prompt[-1].content[:200], "replies": [r.content[:200] for r in i.responses]}
                         for i in items[:SHOWN]]}  # fmt: skip


def _pairs_stage(ctx: StageContext) -> dict[str, Any]:
    return run_pairs(ctx.input("model"), ctx.settings.pairs, ctx.out, ctx.inputs.get("curated"))


def summary(m: dict[str, Any]) -> list[str]:
    lines = [f"- {m.get('items')} items from {m.get('prompts')} prompts, replies of {', '.join(m.get('models', []))}"
             f" ({m.get('skipped')} prompts skipped; {m.get('identical_replies')} items whose replies are all the "
             "same)"]  # fmt: skip
    for ex in m.get("examples", []):
        lines.append(f"- prompt `{ex['prompt'][:80]!r}`: " + " | ".join(f"`{r[:60]!r}`" for r in ex["replies"]))
    return lines


def _pairs_report(ctx: ReportContext) -> list[str]:
    return ["## Pairs to label", "", *summary(ctx.metrics), ""]


def pairs_verb(
    checkpoint: Path = typer.Argument(..., help="The model whose replies are compared: an lmforge checkpoint "
                                      "(runs/NAME/sft/final) or a Hugging Face model directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: candidates.jsonl is written there."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A prompts file (MBPP, GSM8K, messages or "
                                           "prompt records)."),
    curated: Optional[Path] = typer.Option(None, "--curated", help="A run's curate folder, for the docstring "
                                           "prompts (when no --prompts)."),
    checkpoint_other: Optional[List[str]] = typer.Option(None, "--checkpoint", help="NAME=DIR: another model to "
                                                         "compare (repeat); without any, --samples replies of "
                                                         "CHECKPOINT per prompt."),
    samples: Optional[int] = typer.Option(None, "--samples", min=2, help="Replies per prompt from CHECKPOINT alone "
                                          "(default 2)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Prompts used (default 64)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="pairs.* settings (pairs.temperature=1.0 ...)."),
) -> None:
    """Replies of two or more models (or samples of one) to the same prompts, as a candidates file for `lmforge
    judge` or the labelling app (`lmforge label project create --items`)."""
    others = {}
    for spec in checkpoint_other or []:
        key, sep, path = spec.partition("=")
        if not sep or not key or not path:
            verbs.fail(f"--checkpoint wants NAME=DIR, got {spec!r}", 2)
        others[key] = path
    chosen = {"prompts": str(prompts) if prompts else None, "checkpoints": others or None, "samples": samples,
              "limit": limit}  # fmt: skip
    cfg = verbs.stage_settings("pairs", overrides, chosen, section_overrides=True)
    with verbs.output_checked():
        m = verbs.run_stage(PAIRS_STAGE, cfg, out, model=checkpoint, curated=curated)
    for line in [*summary(m), f"- candidates in {out / CANDIDATES}"]:
        typer.echo(line)


# Not a default stage: what to compare is a choice (a recipe adds "pairs", then "judge", to its stages).
PAIRS_STAGE = register(Stage(
    name="pairs", order=52, run=_pairs_stage, sections={"pairs": PairsConfig}, needs=("model", "curated?"),
    default=False, produces={"candidates": CANDIDATES}, report=_pairs_report, verb=pairs_verb,
))  # fmt: skip
