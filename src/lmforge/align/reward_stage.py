"""The reward stage of a recipe and `lmforge reward`: a reward model trained on a preference file from the model
before it (normally sft/final), with held-out pairwise accuracy before and after next to the longer-answer
baseline. Its artifact `reward_model` is the folder `reward/final/` (lmforge.align.reward_model layout), which
PPO, best-of-n and the judges load with `load_reward_model`.

Held-out pairs come from `reward.heldout_data` when given, else a seeded `reward.val_fraction` of `reward.data`
(the same split for the same train.seed, whatever the training settings): training never sees them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from lmforge import verbs
from lmforge.align.preferences import PreferencePair, read_preferences
from lmforge.align.reward_config import RewardConfig
from lmforge.align.rm_train import OUTPUTS, train_reward_model
from lmforge.finetune.sft import split_heldout
from lmforge.model.io import require_checkpoint
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.registry import ReportContext, Stage, StageContext, optional_producer, register
from lmforge.report.format import fmt
from lmforge.train.config import ParallelConfig
from lmforge.train.distributed import init_world

log = logging.getLogger(__name__)


def read_pairs(path: Path, cfg: RewardConfig) -> tuple[list[PreferencePair], dict[str, Any]]:
    """The preference pairs of `path` and its skip counts; an unpaired record (a KTO file) is skipped and counted."""
    records, skipped = read_preferences(path, format=cfg.format, limit=cfg.limit)
    pairs = []
    for record in records:
        if isinstance(record, PreferencePair):
            pairs.append(record)
        else:
            skipped.add(record.source, "unpaired: a labelled reply, not a pair (a KTO file trains no reward model)")
    if not pairs:
        raise ValueError(f"no usable preference pairs in {path} ({skipped.count} records skipped: "
                         f"{skipped.by_reason}; first: {skipped.examples[:3]})")  # fmt: skip
    return pairs, {"records": skipped.count, "by_reason": skipped.by_reason, "examples": skipped.examples}


def split_pairs(cfg: RewardConfig) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
    """(training pairs, held-out pairs, skip counts of the files read) for the settings."""
    if cfg.data is None:
        raise ValueError("reward.data is not set: give a preference file (lmforge reward CKPT --data FILE)")
    pairs, skipped = read_pairs(Path(cfg.data), cfg)
    if cfg.heldout_data is not None:
        heldout, heldout_skipped = read_pairs(Path(cfg.heldout_data), cfg)
        return pairs, heldout, {"data": skipped, "heldout_data": heldout_skipped}
    train_idx, heldout_idx = split_heldout(len(pairs), cfg.val_fraction, cfg.train.seed)
    log.info("%d pairs: %d for training, %d held out", len(pairs), len(train_idx), len(heldout_idx))
    return [pairs[i] for i in train_idx], [pairs[i] for i in heldout_idx], {"data": skipped}


def run_reward(checkpoint: Path, cfg: RewardConfig, out: Path, parallel: ParallelConfig | None = None) -> dict:
    """Train a reward model from `checkpoint` into out/final/ on `cfg`; the stage's metrics. `lmforge reward` and
    the recipe's reward stage both run this."""
    checkpoint = require_checkpoint(checkpoint)  # before the output folder is made
    world = init_world(parallel or ParallelConfig(), cfg.train.device)
    files = {"checkpoint": inputs_fingerprint(checkpoint)}
    for key in ("data", "heldout_data"):
        if getattr(cfg, key) is not None:
            files[key] = inputs_fingerprint(Path(getattr(cfg, key)))
    # The same job (settings, checkpoint, files) resumes in `out`; a different one starts over.
    start_job(out, "reward", cfg.semantic(), files, OUTPUTS, world)
    train_pairs, heldout_pairs, read_skipped = split_pairs(cfg)
    metrics = train_reward_model(checkpoint, train_pairs, heldout_pairs, out, cfg.train, margin=cfg.margin,
                                 center_coef=cfg.center_coef, max_len=cfg.max_len,
                                 max_prompt_len=cfg.max_prompt_len, seed=cfg.train.seed,
                                 parallel=parallel)  # fmt: skip
    return {**metrics, "read_skipped": read_skipped, "data": cfg.data, "heldout_data": cfg.heldout_data}


def data_from_run(cfg: Any, ctx: StageContext) -> Any:
    """`cfg` with `data` set to the labels an earlier stage of the run wrote (the judge or cai stage's
    "preferences") when the recipe names no file; unchanged otherwise."""
    if cfg.data is None and "preferences" in ctx.inputs:
        return cfg.model_copy(update={"data": str(ctx.inputs["preferences"])})
    return cfg


def _reward_stage(ctx: StageContext) -> dict[str, Any]:
    return run_reward(ctx.input("model"), data_from_run(ctx.settings.reward, ctx), ctx.out, ctx.settings.parallel)


def _check_data(settings: Any) -> None:
    """A recipe that runs the reward stage names its preference file, or has a stage before it that labels pairs
    (judge, cai): there is no default data to learn from."""
    if settings.reward.data is None and optional_producer("preferences?", REWARD_STAGE, list(settings.stages)) is None:
        raise ValueError("the reward stage needs preference data: set reward.data to a preference file (hh-rlhf, "
                         "TRL, LLaMA-Factory dpo, PandaLM or lmforge records), or add a stage that labels pairs "
                         "(judge, cai) before it")  # fmt: skip


def _interval(acc: dict[str, Any] | None) -> str:
    if not acc:
        return "n/a"
    return f"{fmt(acc['value'], '.3f')} [{fmt(acc['ci95'][0], '.3f')}, {fmt(acc['ci95'][1], '.3f')}]"


def summary(m: dict[str, Any]) -> list[str]:
    """Lines saying what the reward model learned: held-out accuracy before and after, the length baseline."""
    before, after = m.get("heldout_before") or {}, m.get("heldout_after") or {}
    lines = [f"- {m.get('train_pairs')} training pairs ({m.get('skipped_pairs')} skipped), {m.get('heldout_pairs')} "
             f"held out; {m.get('steps')} steps in {fmt(m.get('train_seconds'), '.1f')} s"]  # fmt: skip
    if after:
        n = after["accuracy"]["n"]
        lines += [f"- held-out pairwise accuracy (ties half, 95% interval, {n} pairs): "
                  f"{_interval(before.get('accuracy'))} before, {_interval(after.get('accuracy'))} after",
                  f"- longer answer wins, on the same pairs: {_interval(after.get('length_baseline'))}"]  # fmt: skip
    return lines


def _reward_report(ctx: ReportContext) -> list[str]:
    return ["## Reward model", "", f"- data: {ctx.metrics.get('data')}", *summary(ctx.metrics), ""]


@verbs.resumable
def reward_verb(
    checkpoint: Path = typer.Argument(..., help="The model to start from (normally a fine-tuned one): an lmforge "
                                      "checkpoint or a Hugging Face model directory."),
    data: Path = typer.Option(..., "--data", help="Preference pairs: hh-rlhf, TRL prompt/chosen/rejected, "
                              "LLaMA-Factory dpo or PandaLM records (.json, .jsonl or .jsonl.gz)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes, a "
                             "changed setting, data file or checkpoint starts it over."),
    heldout_data: Optional[Path] = typer.Option(None, "--heldout-data", help="Pairs to evaluate on; without it, "
                                                "--val-fraction of --data is held out."),
    format: Optional[str] = typer.Option(None, "--format", help="hh_rlhf, trl, llamafactory_dpo, pandalm or lmforge "
                                         "(default: detected)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read only the first N pairs of each file."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", min=0.0, max=0.9,
                                                 help="Share of --data held out (default 0.1)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", min=1, help="Tokens per side (default: the model's "
                                          "max_seq_len); a longer reply keeps its head."),
    max_prompt_len: Optional[int] = typer.Option(None, "--max-prompt-len", min=1, help="A longer prompt keeps its "
                                                 "last N tokens (default: a prompt leaving no room is skipped)."),
    margin: Optional[str] = typer.Option(None, "--margin", help="The chosen score must lead by this much: a "
                                         "number, or 'from data' (each TRL record's margin key)."),
    center_coef: Optional[float] = typer.Option(None, "--center-coef", min=0.0, help="Weight of the term keeping "
                                                "scores near 0 (e.g. 0.01)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="train.* settings (train.max_steps=200 ...); under "
                                                    "torchrun, parallel.* settings."),
) -> None:
    """Train a reward model (the backbone plus a scalar head, Bradley-Terry loss) on preference pairs, reporting
    held-out pairwise accuracy before and after, next to the longer-answer baseline."""
    chosen = {"data": str(data), "heldout_data": str(heldout_data) if heldout_data else None, "format": format,
              "limit": limit, "val_fraction": val_fraction, "max_len": max_len, "max_prompt_len": max_prompt_len,
              "margin": margin, "center_coef": center_coef}  # fmt: skip
    cfg = verbs.stage_settings("reward", overrides, chosen)
    with verbs.output_checked():
        m = verbs.run_stage(REWARD_STAGE, cfg, out, model=checkpoint)
    for line in [*summary(m), f"- reward model in {out / 'final'}"]:
        log.info("%s", line)  # through the log, as rank 0 alone reports under torchrun


# Not a default stage: a reward model needs preference data chosen for it (a recipe adds "reward" to its stages).
REWARD_STAGE = register(Stage(
    name="reward", order=54, run=_reward_stage, sections={"reward": RewardConfig}, needs=("model", "preferences?"),
    training=True,
    default=False, check=_check_data, produces={"reward_model": "final"}, report=_reward_report, verb=reward_verb,
))  # fmt: skip


__all__ = ["run_reward", "split_pairs", "read_pairs", "data_from_run"]
