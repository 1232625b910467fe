"""The dpo stage of a recipe and `lmforge dpo`: the model before it (normally sft/final) tuned on a preference file
with one loss of the DPO family (lmforge.align.dpo), reporting held-out reward margin and accuracy before and
after. Its artifact `model` is `dpo/final/`.

Held-out records are a seeded `dpo.val_fraction` of `dpo.data` (the same split for the same train.seed, whatever
the training settings), at most `dpo.heldout_limit` of them: training never sees them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from lmforge import verbs
from lmforge.align.dpo import FALLING_ADVICE, HELDOUT, OUTPUTS, train_dpo
from lmforge.align.dpo_config import DPOConfig
from lmforge.align.preferences import LabelledReply, read_preferences
from lmforge.align.reward_stage import data_from_run
from lmforge.finetune.sft import split_heldout
from lmforge.model.io import require_checkpoint
from lmforge.model.lora import LoRAConfig
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt
from lmforge.train.config import ParallelConfig
from lmforge.train.distributed import init_world

log = logging.getLogger(__name__)


def split_records(cfg: DPOConfig) -> tuple[list, list, dict[str, Any]]:
    """(training records, held-out records, skip counts of the file) for the settings."""
    if cfg.data is None:
        raise ValueError("dpo.data is not set: give a preference file (lmforge dpo CKPT --data FILE)")
    records, skipped = read_preferences(cfg.data, format=cfg.format, limit=cfg.limit)
    if cfg.loss != "kto" and any(isinstance(r, LabelledReply) for r in records):
        raise ValueError(f"{cfg.data} holds unpaired labelled replies, which only dpo.loss=kto trains on "
                         f"(dpo.loss={cfg.loss})")  # fmt: skip
    if len(records) < 2:
        raise ValueError(f"{cfg.data}: {len(records)} usable records ({skipped.count} skipped: {skipped.by_reason}; "
                         f"first: {skipped.examples[:3]}); DPO needs at least 2")  # fmt: skip
    train_idx, heldout_idx = split_heldout(len(records), cfg.val_fraction, cfg.train.seed)
    heldout_idx = heldout_idx[: cfg.heldout_limit]
    log.info("%d records: %d for training, %d held out", len(records), len(train_idx), len(heldout_idx))
    counts = {"records": skipped.count, "by_reason": skipped.by_reason, "examples": skipped.examples}
    return [records[i] for i in train_idx], [records[i] for i in heldout_idx], counts


def run_dpo(checkpoint: Path, cfg: DPOConfig, out: Path, parallel: ParallelConfig | None = None) -> dict[str, Any]:
    """Tune `checkpoint` into out/final/ with the DPO family on `cfg`; the stage's metrics. `lmforge dpo` and the
    recipe's dpo stage both run this."""
    checkpoint = require_checkpoint(checkpoint)  # before the output folder is made
    world = init_world(parallel or ParallelConfig(), cfg.train.device)
    files = {"checkpoint": inputs_fingerprint(checkpoint)}
    if cfg.data is not None:
        files["data"] = inputs_fingerprint(Path(cfg.data))
    # The same job (settings, checkpoint, file) resumes in `out`; a different one starts over.
    start_job(out, "dpo", cfg.semantic(), files, OUTPUTS, world)
    train_records, heldout_records, read_skipped = split_records(cfg)
    lora = (LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=tuple(cfg.lora_targets)) if cfg.method == "lora" else None)  # fmt: skip
    metrics = train_dpo(checkpoint, train_records, heldout_records, out, cfg.train, loss_type=cfg.loss,
                        beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
                        desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                        method=cfg.method, lora=lora, reference=cfg.reference, max_len=cfg.max_len,
                        max_prompt_len=cfg.max_prompt_len, falling_evals=cfg.falling_evals, seed=cfg.train.seed,
                        parallel=parallel)  # fmt: skip
    return {**metrics, "read_skipped": read_skipped, "data": cfg.data}


def _dpo_stage(ctx: StageContext) -> dict[str, Any]:
    return run_dpo(ctx.input("model"), data_from_run(ctx.settings.dpo, ctx), ctx.out, ctx.settings.parallel)


def summary(m: dict[str, Any]) -> list[str]:
    """Lines saying what preference tuning did: held-out reward margin and accuracy before and after."""
    before, after = m.get("heldout_before") or {}, m.get("heldout_after") or {}
    lines = [f"- loss {m.get('loss_type')} (beta {m.get('beta')}), method {m.get('method')}, reference "
             f"{m.get('reference')}; {m.get('train_pairs')} training and {m.get('heldout_pairs')} held-out examples "
             f"({m.get('skipped_records')} skipped); {m.get('steps')} steps in {fmt(m.get('train_seconds'), '.1f')} s"]
    if after:
        get = lambda d, k: d.get(HELDOUT + k)  # noqa: E731
        lines += [f"- held-out reward margin {fmt(get(before, 'rewards/margin'))} before, "
                  f"{fmt(get(after, 'rewards/margin'))} after; accuracy {fmt(get(before, 'rewards/accuracy'), '.3f')} "
                  f"before, {fmt(get(after, 'rewards/accuracy'), '.3f')} after (ties count as wrong)",
                  f"- held-out chosen reward {fmt(get(after, 'rewards/chosen'))}, rejected "
                  f"{fmt(get(after, 'rewards/rejected'))}; KL per chosen token {fmt(get(after, 'kl'))}"]  # fmt: skip
    if m.get("chosen_reward_falling"):
        lines.append(f"- WARNING: the held-out chosen reward kept falling and ended below its start. Try: "
                     f"{FALLING_ADVICE}")  # fmt: skip
    return lines


def _dpo_report(ctx: ReportContext) -> list[str]:
    return ["## Preference tuning (DPO family)", "", f"- data: {ctx.metrics.get('data')}", *summary(ctx.metrics), ""]


@verbs.resumable
def dpo_verb(
    checkpoint: Path = typer.Argument(..., help="The model to tune (normally a fine-tuned one): an lmforge "
                                      "checkpoint or a Hugging Face model directory."),
    data: Path = typer.Option(..., "--data", help="Preference data: hh-rlhf, TRL prompt/chosen/rejected, "
                              "LLaMA-Factory dpo or kto, or PandaLM records (.json, .jsonl or .jsonl.gz)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes, a "
                             "changed setting, data file or checkpoint starts it over."),
    loss: Optional[str] = typer.Option(None, "--loss", help="sigmoid (DPO, default), robust, ipo, simpo or kto."),
    method: Optional[str] = typer.Option(None, "--method", help="full (default) or lora."),
    beta: Optional[float] = typer.Option(None, "--beta", help="The loss's temperature (default 0.1)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="cached (default: computed once into "
                                            "OUT/reference/) or frozen (a copy of the model in memory)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="sigmoid, robust: the assumed "
                                                    "label-flip rate, in [0, 0.5)."),
    format: Optional[str] = typer.Option(None, "--format", help="The file's format (default: detected)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read only the first N records."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", min=0.0, max=0.9,
                                                 help="Share of --data held out (default 0.1)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", min=1, help="Tokens per side (default: the model's "
                                          "max_seq_len); a longer prompt is skipped, a longer reply cut."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1, help="LoRA: rank (default 8)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="LoRA: comma-separated module-name "
                                               "suffixes (default q_proj,v_proj)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="train.* settings (train.max_steps=200 ...) and "
                                                    "dpo.* settings; under torchrun, parallel.* settings."),
) -> None:
    """Tune a model on preference data with DPO, robust DPO, IPO, SimPO or KTO (full or LoRA), reporting the
    held-out reward margin and accuracy before and after."""
    chosen = {"data": str(data), "loss": loss, "method": method, "beta": beta, "reference": reference,
              "label_smoothing": label_smoothing, "format": format, "limit": limit, "val_fraction": val_fraction,
              "max_len": max_len, "lora_rank": lora_rank,
              "lora_targets": [t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None}
    cfg = verbs.stage_settings("dpo", overrides, chosen, section_overrides=True)
    with verbs.output_checked():
        m = verbs.run_stage(DPO_STAGE, cfg, out, model=checkpoint)
    typer.echo("\n".join([*summary(m), f"model in {out / 'final'}"]))


# Not a default stage: preference tuning needs preference data chosen for it (a recipe adds "dpo" to its stages).
DPO_STAGE = register(Stage(
    name="dpo", order=55, run=_dpo_stage, sections={"dpo": DPOConfig}, needs=("model", "preferences?"),
    training=True,
    default=False, produces={"model": "final"}, report=_dpo_report, verb=dpo_verb,
))  # fmt: skip


__all__ = ["run_dpo", "split_records"]
