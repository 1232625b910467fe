"""The cai stage of a recipe and `lmforge cai`: constitutional AI on the model before it (normally sft/final).

1. SL-CAI (lmforge.align.cai): the model answers `cai.max_prompts` red-team prompts, critiques and revises its
   replies under principles drawn from the constitution, and is fine-tuned (the sft stage's training function,
   lmforge.finetune.sft) on the revised replies: out/final/.
2. RL-CAI: the fine-tuned model samples two replies per prompt and, as an LLM judge asked one drawn principle's
   preference question, labels them: data/rl_preferences.jsonl, the `preferences` artifact a reward or dpo stage
   reads when its `data` is not set.
3. The HHH evaluations (lmforge eval's hhh and hhh_replies tasks, found under `cai.task_dir`) before and after.

Red-team prompts (`cai.prompts`): a preference file (hh-rlhf harmless-base: each record's first human turn, the
opening request, each distinct one once) or a prompts file (lmforge.align.prompts). out/data/ holds sl_sft.jsonl,
sl_pairs.jsonl, sl_trace.jsonl (every critique and revision) and rl_preferences.jsonl.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from pydantic import Field
from torch import nn

from lmforge import verbs
from lmforge.align import preferences
from lmforge.align.cai import SFT_FILE, ai_preferences, critique_revise, write_jsonl, write_sl_data
from lmforge.align.constitution import default_constitution, load_constitution
from lmforge.align.prompts import read_prompts
from lmforge.align.rollout import prompt_seed
from lmforge.eval.config import EvalConfig
from lmforge.eval.scorer import from_lmforge
from lmforge.eval.suite import run_suite
from lmforge.finetune.config import SFTTrainConfig
from lmforge.finetune.data import Conversation, Skipped, iter_records, read_conversations
from lmforge.finetune.sft import finetune_conversations
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import generate
from lmforge.judge.base import JudgeItem
from lmforge.model.io import load_checkpoint_tokenizer, load_model, require_checkpoint
from lmforge.model.modes import evaluating
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt
from lmforge.settings import Section
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import OUTPUTS

log = logging.getLogger(__name__)

DATA_DIR = "data"
RL_FILE = "rl_preferences.jsonl"
_RL_STREAM = 1  # seed part of the RL-CAI samples, apart from SL-CAI's generations


class CAITrainConfig(SFTTrainConfig):
    """The fine-tuning on the revised replies: the sft stage's settings, shorter (the set is one reply per prompt)."""

    max_steps: int = Field(30, gt=0)
    eval_every: int = Field(30, gt=0)
    ckpt_every: int = Field(30, gt=0)


class CAIConfig(Section):
    """The cai stage (docs/alignment.md, "Constitutional AI")."""

    # Red-team prompts: a preference file (hh-rlhf: each record's first human turn) or a prompts file.
    prompts: str | None = None
    max_prompts: int = Field(64, gt=0)  # the first N distinct prompts
    constitution: str | None = None  # lmforge YAML, a CAI paper JSON file or folder; None: the shipped default
    rounds: int = Field(1, ge=1)  # critique -> revision rounds per prompt
    few_shot: int = Field(2, ge=0)  # the constitution's examples shown (those that fit the context)
    max_new_tokens: int = Field(64, gt=0)  # per reply, critique and revision
    temperature: float = Field(0.7, gt=0.0)
    rl_preferences: bool = True  # RL-CAI: label two sampled replies per prompt with the tuned model as judge
    # The HHH evaluations before and after (lmforge eval's task names), found under task_dir; None: not run.
    task_dir: str | None = None
    hhh_tasks: list[str] = Field(default_factory=lambda: ["hhh", "hhh_replies"])
    hhh_limit: int | None = Field(None, gt=0)  # records per HHH task; None: all 438
    train: CAITrainConfig = Field(default_factory=CAITrainConfig)


def red_team_prompts(path: Path, limit: int) -> tuple[list[Conversation], list[str], dict[str, Any]]:
    """(up to `limit` distinct prompts, their ids, read counts) from a preference or a prompts file."""
    skipped = Skipped()
    first = next((rec for _, rec in iter_records(path, skipped)), None)
    if preferences.detect_format(first) is not None:
        pairs, skipped = preferences.read_preferences(path)
        found = [([pair.prompt[0]], pair.source) for pair in pairs if pair.prompt and pair.prompt[0].role == "user"]
    else:
        items, skipped = read_prompts(path)
        found = [(item.messages, item.meta["id"]) for item in items]
    seen: set[tuple[str, ...]] = set()
    prompts, ids = [], []
    for conversation, source in found:
        key = tuple(m.content for m in conversation)
        if key not in seen and len(prompts) < limit:
            seen.add(key)
            prompts.append(conversation)
            ids.append(source)
    if not prompts:
        raise ValueError(f"{path}: no usable red-team prompt ({skipped.count} records skipped: {skipped.examples[:3]})")
    return prompts, ids, {"read_skipped": skipped.count, "duplicates": len(found) - len(seen)}


def hhh_scores(model: nn.Module, tok: Tokenizer, cfg: CAIConfig) -> dict[str, Any] | None:
    """acc and acc_norm of the HHH tasks (None when cai.task_dir is not set)."""
    if cfg.task_dir is None:
        return None
    suite = EvalConfig(tasks=cfg.hhh_tasks, task_dir=cfg.task_dir, limit=cfg.hhh_limit, contamination=False)
    with evaluating(model):
        results = run_suite(from_lmforge(model, tok), suite)
    return {name: {k: r[k] for k in ("acc", "acc_norm", "n")} for name, r in results.items()}


def sample_pairs(model: nn.Module, tok: Tokenizer, prompts: list[Conversation], ids: list[str], cfg: CAIConfig,
                 skipped: Skipped) -> list[JudgeItem]:  # fmt: skip
    """Two replies per prompt from `model` (seeded per prompt); identical or empty pairs are counted, not judged."""
    items = []
    room = model.args.max_seq_len - cfg.max_new_tokens
    with evaluating(model):
        for i, (prompt, item_id) in enumerate(zip(prompts, ids)):
            p = prompt_ids(tok, prompt)
            if len(p) > room:
                skipped.add(item_id, "prompt too long: no room for the reply in the context")
                continue
            outs = generate(model, [p, p], cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=tok.stop_ids,
                            seed=prompt_seed(cfg.train.seed, _RL_STREAM, i))  # fmt: skip
            a, b = (tok.decode(o, skip_special_tokens=True).strip() for o in outs)
            if not a or not b or a == b:
                skipped.add(item_id, "no pair: the two replies are empty or the same")
                continue
            items.append(JudgeItem(prompt, a, b, meta={"id": item_id}))
    return items


def run_cai(checkpoint: Path, cfg: CAIConfig, out: Path) -> dict[str, Any]:
    """SL-CAI, fine-tuning on its revisions, RL-CAI labels and the HHH scores before and after; the metrics.
    `lmforge cai` and the recipe's cai stage both run this."""
    checkpoint = require_checkpoint(checkpoint)
    if cfg.prompts is None:
        raise ValueError("cai.prompts is not set: give red-team prompts (a preference file such as hh-rlhf's "
                         "harmless-base, or a prompts file): lmforge cai CKPT --prompts FILE")  # fmt: skip
    inputs = {"checkpoint": inputs_fingerprint(checkpoint), "prompts": inputs_fingerprint(Path(cfg.prompts))}
    if cfg.constitution is not None:
        inputs["constitution"] = inputs_fingerprint(Path(cfg.constitution))
    start_job(out, "cai", cfg.semantic(), inputs, (*OUTPUTS, DATA_DIR))
    constitution = load_constitution(cfg.constitution) if cfg.constitution else default_constitution()
    prompts, ids, counts = red_team_prompts(Path(cfg.prompts), cfg.max_prompts)
    model, _ = load_model(checkpoint)
    tok = load_checkpoint_tokenizer(checkpoint)
    hhh_before = hhh_scores(model, tok, cfg)

    t0 = time.perf_counter()
    sl_skipped = Skipped()
    revisions = critique_revise(model, tok, prompts, constitution, rounds=cfg.rounds, seed=cfg.train.seed,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                few_shot=cfg.few_shot, ids=ids, skipped=sl_skipped)  # fmt: skip
    sl_counts = write_sl_data(revisions, out / DATA_DIR)
    sl_seconds = time.perf_counter() - t0
    train_convs, _ = read_conversations(out / DATA_DIR / SFT_FILE)
    if not train_convs:
        raise ValueError(f"SL-CAI left nothing to train on: {len(prompts)} prompts, {sl_skipped.count} skipped "
                         f"({sl_skipped.by_reason}), {sl_counts['unchanged']} without a usable revision; see "
                         f"{out / DATA_DIR / 'sl_trace.jsonl'}")  # fmt: skip

    def after_training(tuned: nn.Module) -> dict[str, Any]:
        return {"hhh_after": hhh_scores(tuned, tok, cfg)}

    metrics = finetune_conversations(checkpoint, train_convs, [], out, cfg.train, seed=cfg.train.seed,
                                     after_training=after_training)  # fmt: skip
    rl: dict[str, Any] = {}
    if cfg.rl_preferences:
        t1 = time.perf_counter()
        tuned, _ = load_model(out / "final")
        rl_skipped = Skipped()
        items = sample_pairs(tuned, tok, prompts, ids, cfg, rl_skipped)
        records = ai_preferences(tuned, tok, items, constitution, cfg.train.seed, rl_skipped) if items else []
        write_jsonl(out / DATA_DIR / RL_FILE, records)
        rl = {"rl_records": len(records), "rl_ties": sum(r["tie"] for r in records), "rl_skipped": rl_skipped.count,
              "rl_skipped_by_reason": rl_skipped.by_reason, "rl_seconds": time.perf_counter() - t1}  # fmt: skip
    return {**metrics, **counts, **sl_counts, **rl, "prompts": len(prompts), "sl_skipped": sl_skipped.count,
            "sl_skipped_by_reason": sl_skipped.by_reason, "sl_seconds": sl_seconds, "hhh_before": hhh_before,
            "constitution": constitution.name, "rounds": cfg.rounds, "prompts_source": cfg.prompts}  # fmt: skip


def _check_prompts(settings: Any) -> None:
    """A recipe that runs the cai stage names its red-team prompts (a clear error at load time, not after the stages
    before it ran)."""
    if settings.cai.prompts is None:
        raise ValueError("the cai stage needs red-team prompts: set cai.prompts to a preference file (hh-rlhf "
                         "harmless-base: the first human turns) or a prompts file")  # fmt: skip


def _cai_stage(ctx: StageContext) -> dict[str, Any]:
    return run_cai(ctx.input("model"), ctx.settings.cai, ctx.out)


def _acc(scores: dict[str, Any] | None, task: str, key: str) -> str:
    m = (scores or {}).get(task, {}).get(key)
    return f"{fmt(m['value'], '.3f')} [{fmt(m['ci95'][0], '.3f')}, {fmt(m['ci95'][1], '.3f')}]" if m else "n/a"


def summary(m: dict[str, Any]) -> list[str]:
    """What the stage did: the revised set, the fine-tuning, the AI labels and the HHH scores before and after."""
    lines = [f"- constitution {m.get('constitution')}, {m.get('rounds')} round(s) on {m.get('prompts')} prompts "
             f"({m.get('sl_skipped')} skipped) in {fmt(m.get('sl_seconds'), '.1f')} s: {m.get('sft_records')} revised "
             f"replies to train on, {m.get('unchanged')} without a usable revision",
             f"- fine-tuned {m.get('steps')} steps in {fmt(m.get('train_seconds'), '.1f')} s"]  # fmt: skip
    if "rl_records" in m:
        lines.append(f"- RL-CAI: {m['rl_records']} AI-labelled pairs ({m['rl_ties']} ties, {m['rl_skipped']} "
                     f"skipped) in {fmt(m.get('rl_seconds'), '.1f')} s")
    for task in (m.get("hhh_before") or {}):
        lines.append(f"- {task}: acc {_acc(m['hhh_before'], task, 'acc')} before, "
                     f"{_acc(m.get('hhh_after'), task, 'acc')} after; acc_norm "
                     f"{_acc(m['hhh_before'], task, 'acc_norm')} before, {_acc(m.get('hhh_after'), task, 'acc_norm')} "
                     f"after (n={m['hhh_before'][task]['n']})")  # fmt: skip
    return lines


def _cai_report(ctx: ReportContext) -> list[str]:
    return ["## Constitutional AI", "", f"- red-team prompts: {ctx.metrics.get('prompts_source')}",
            *summary(ctx.metrics), ""]  # fmt: skip


@verbs.resumable
def cai_verb(
    checkpoint: Path = typer.Argument(..., help="The model to align (normally a fine-tuned one): an lmforge "
                                      "checkpoint or a Hugging Face model directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes."),
    prompts: Path = typer.Option(..., "--prompts", help="Red-team prompts: a preference file (hh-rlhf "
                                 "harmless-base: the first human turns) or a prompts file."),
    constitution: Optional[Path] = typer.Option(None, "--constitution", help="lmforge YAML, one of the CAI "
                                                "paper's JSON files, or a folder of them (default: lmforge's)."),
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="Where the HHH evaluations are "
                                            "(438HHHEvaluations.jsonl), scored before and after."),
    overrides: Optional[List[str]] = typer.Argument(None, help="cai.* settings (cai.rounds=2, cai.max_prompts=64 "
                                                    "...) and train.* settings of the fine-tuning."),
) -> None:
    """Constitutional AI: critique and revise replies to red-team prompts under a constitution, fine-tune on the
    revisions, label reply pairs with AI preferences, and score the HHH evaluations before and after."""
    chosen = {"prompts": str(prompts), "constitution": str(constitution) if constitution else None,
              "task_dir": str(task_dir) if task_dir else None}  # fmt: skip
    cfg = verbs.stage_settings("cai", overrides, chosen, section_overrides=True)
    with verbs.output_checked():
        m = verbs.run_stage(CAI_STAGE, cfg, out, model=checkpoint)
    typer.echo("\n".join([*summary(m), f"model in {out / 'final'}, data in {out / DATA_DIR}"]))


# Not a default stage: it needs red-team prompts chosen for it and a model that follows the chat template.
CAI_STAGE = register(Stage(
    name="cai", order=51, run=_cai_stage, sections={"cai": CAIConfig}, needs=("model",), default=False,
    produces={"model": "final", "preferences": f"{DATA_DIR}/{RL_FILE}"}, check=_check_prompts, report=_cai_report,
    verb=cai_verb,
))  # fmt: skip
