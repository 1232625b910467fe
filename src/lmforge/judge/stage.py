"""The judge stage of a recipe and `lmforge judge`: an AI judge labels every pair of responses of a candidates file
(or of any preference file: lmforge.label.candidates.read_candidates) and writes the verdicts as `lmforge`
preference records with their provenance, which the reward and dpo stages read like any preference file.

    lmforge judge runs/x/pairs/candidates.jsonl -o prefs.jsonl --judge llm:runs/x/sft/final --rubric rubric.txt

Judges (`judge.judge`, KIND[:SPEC]): `length`, `reward:DIR` (a reward model folder), `llm:CKPT` (any checkpoint),
`verifier:NAME` (a reward function of lmforge.align.rewards, checking each item's reference). Where the items carry
a known answer (meta["label"]: a preference file's chosen side, PandaLM's majority vote), the metrics say how often
the judge agrees with it, and Cohen's kappa.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Optional

import typer
from pydantic import Field, field_validator

from lmforge import verbs
from lmforge.io import atomic_open
from lmforge.judge.base import Judge, JudgeItem, LengthJudge, Verdict, position_bias_rate, verdict_record
from lmforge.label.agreement import cohen_kappa
from lmforge.label.candidates import Candidate, pairs_of, read_candidates
from lmforge.outdir import inputs_fingerprint
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt
from lmforge.settings import Section

log = logging.getLogger(__name__)

KINDS = ("length", "reward", "llm", "verifier")
OUTPUT = "preferences.jsonl"


class JudgeConfig(Section):
    """The judge stage (docs/judges.md): which judge labels the candidates, and how."""

    judge: str = "length"  # KIND[:SPEC]: length, reward:DIR, llm:CKPT, verifier:NAME
    rubric: str | None = None  # an LLM judge's instruction: text, or a file holding it (default: judge.llm's)
    # Or the preference question of one principle of a constitution (a file, or "default": lmforge's own)
    constitution: str | None = None
    principle: str | None = None  # the principle's name (default: the first with a preference question)
    batch_size: int = Field(8, gt=0)  # items per forward (an LLM judge runs two rows per item)
    tie_margin: float = Field(0.0, ge=0.0)  # a reward judge's scores this close tie
    limit: int | None = Field(None, gt=0)  # judge only the first N items
    device: str = "auto"

    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})

    @field_validator("judge")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        kind, _, spec = value.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown judge kind {kind!r} in {value!r}; expected one of {list(KINDS)} (KIND[:SPEC])")
        if kind != "length" and not spec:
            raise ValueError(f"judge {kind!r} needs a spec: {kind}:{'NAME' if kind == 'verifier' else 'DIR'}")
        return value


def rubric_text(rubric: str | None) -> str | None:
    """The rubric itself: a file's text when `rubric` names an existing file, else `rubric` as given."""
    if rubric is not None and Path(rubric).is_file():
        return Path(rubric).read_text(encoding="utf-8").strip()
    return rubric


def instruction(cfg: JudgeConfig) -> str | None:
    """An LLM judge's instruction: the rubric, or a constitution principle's preference question (None: the
    judge's default rubric)."""
    if cfg.constitution is None:
        return rubric_text(cfg.rubric)
    from lmforge.align.constitution import default_constitution, load_constitution

    if cfg.rubric is not None:
        raise ValueError("judge.rubric and judge.constitution both set: give one instruction")
    found = default_constitution() if cfg.constitution == "default" else load_constitution(cfg.constitution)
    usable = [p for p in found.principles if p.preference and cfg.principle in (None, p.name)]
    if not usable:
        names = [p.name for p in found.principles if p.preference]
        raise ValueError(f"constitution {cfg.constitution}: no principle {cfg.principle!r} with a preference question "
                         f"(those with one: {names})")  # fmt: skip
    return usable[0].preference


def build_judge(cfg: JudgeConfig) -> Judge:
    """The judge `cfg.judge` names, loaded (models on cfg.device)."""
    kind, _, spec = cfg.judge.partition(":")
    if kind == "length":
        return LengthJudge()
    if kind == "reward":
        from lmforge.judge.reward import RewardJudge

        return RewardJudge.from_dir(spec, cfg.judge, cfg.tie_margin, cfg.batch_size, cfg.device)
    if kind == "llm":
        from lmforge.judge.llm import DEFAULT_RUBRIC, LLMJudge

        return LLMJudge.from_checkpoint(spec, instruction(cfg) or DEFAULT_RUBRIC, cfg.judge, cfg.device,
                                        cfg.batch_size)  # fmt: skip
    from lmforge.judge.verifier import VerifierJudge

    return VerifierJudge(spec, cfg.judge)


def pair_items(candidates: list[Candidate]) -> list[tuple[Candidate, int, int, JudgeItem]]:
    """Every pair of responses of every candidate (pairs_of), as the item a judge compares."""
    return [(c, i, j, JudgeItem(c.prompt, c.responses[i].content, c.responses[j].content, c.reference, c.meta))
            for c in candidates for i, j in pairs_of(c)]  # fmt: skip


def known_label(candidate: Candidate, i: int, j: int) -> str | None:
    """The known answer for responses (i, j): meta["label"] compares the first two responses."""
    label = candidate.meta.get("label")
    return label if (i, j) == (0, 1) and label in ("a", "b", "tie") else None


def agreement(verdicts: list[Verdict], labels: list[str | None]) -> dict[str, Any] | None:
    """Accuracy (exact choice, ties included) and Cohen's kappa of the judged items against their known labels."""
    pairs = [(v.choice, label) for v, label in zip(verdicts, labels) if label is not None and not v.skipped]
    if not pairs:
        return None
    judged, known = zip(*pairs)
    return {"n": len(pairs), "accuracy": sum(a == b for a, b in pairs) / len(pairs),
            "kappa": cohen_kappa(list(judged), list(known))}  # fmt: skip


def judge_candidates(judge: Judge, candidates: list[Candidate], batch_size: int = 8
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """The preference records of every judged pair, and the metrics: choices, skipped items with why, position
    bias (LLM judges), agreement with known labels."""
    pairs = pair_items(candidates)
    verdicts: list[Verdict] = []
    for start in range(0, len(pairs), batch_size * 4):  # progress every few batches; judges batch inside
        verdicts += judge.compare_many([item for *_, item in pairs[start : start + batch_size * 4]])
        log.info("judged %d / %d pairs", len(verdicts), len(pairs))
    records, skipped = [], Counter()
    for (c, i, j, item), verdict in zip(pairs, verdicts):
        if verdict.skipped:
            skipped[verdict.skipped.split(":", 1)[0]] += 1
            log.warning("%s (%s, responses %d and %d): skipped: %s", c.id, c.source, i, j, verdict.skipped)
            continue
        models = (c.responses[i].model, c.responses[j].model)
        records.append(verdict_record(item, verdict, judge.name, item_id=c.id, models=models, id=f"{c.id}/{i}-{j}"))
    metrics = {"judge": judge.name, "items": len(candidates), "pairs": len(pairs), "records": len(records),
               "skipped": dict(skipped), "choices": dict(Counter(v.choice for v in verdicts if not v.skipped)),
               "position_bias": position_bias_rate([v for v in verdicts if not v.skipped]),
               "truncated": getattr(judge, "truncated", 0),
               "agreement": agreement(verdicts, [known_label(c, i, j) for c, i, j, _ in pairs])}  # fmt: skip
    return records, metrics


def run_judge(items: Path, cfg: JudgeConfig, out: Path) -> dict[str, Any]:
    """Judge the items file into the preference file `out` (atomically); the metrics. `lmforge judge` and the
    recipe's judge stage both run this."""
    candidates, read_skipped = read_candidates(items, cfg.limit)
    if not candidates:
        raise ValueError(f"no usable items in {items} ({read_skipped.count} records skipped: "
                         f"{read_skipped.by_reason}; first: {read_skipped.examples[:3]})")  # fmt: skip
    records, metrics = judge_candidates(build_judge(cfg), candidates, cfg.batch_size)
    with atomic_open(out) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {**metrics, "read_skipped": {"records": read_skipped.count, "by_reason": read_skipped.by_reason,
                                        "examples": read_skipped.examples}}  # fmt: skip


def summary(m: dict[str, Any]) -> list[str]:
    """What the judge decided, and how it agrees with known labels where the items had them."""
    lines = [f"- {m['judge']}: {m['records']} preferences from {m['pairs']} pairs of {m['items']} items "
             f"(choices {m['choices']}; skipped {m['skipped'] or 0}; replies cut to fit {m['truncated']})"]
    if m.get("position_bias") is not None:
        lines.append(f"- position bias (the same position won in both orders): {fmt(m['position_bias'], '.3f')}")
    if m.get("agreement"):
        a = m["agreement"]
        lines.append(f"- against the items' known labels ({a['n']} pairs): accuracy {fmt(a['accuracy'], '.3f')}, "
                     f"Cohen's kappa {fmt(a['kappa'], '.3f')}")
    return lines


def _judge_sources(settings: Any) -> dict[str, str]:
    """The judge's model and rubric file live outside the run: their fingerprints re-run the stage on a change."""
    cfg = settings.judge
    kind, _, spec = cfg.judge.partition(":")
    found = {"judge": inputs_fingerprint(Path(spec))} if kind in ("reward", "llm") else {}
    for key in ("rubric", "constitution"):
        if getattr(cfg, key) is not None and Path(getattr(cfg, key)).exists():
            found[key] = inputs_fingerprint(Path(getattr(cfg, key)))
    return found


def _judge_stage(ctx: StageContext) -> dict[str, Any]:
    return run_judge(ctx.input("candidates"), ctx.settings.judge, ctx.out / OUTPUT)


def _judge_report(ctx: ReportContext) -> list[str]:
    return ["## AI judge", "", *summary(ctx.metrics), ""]


def judge_verb(
    items: Path = typer.Argument(..., help="A candidates file (lmforge label / the pairs stage) or any preference "
                                 "file (hh-rlhf, TRL, PandaLM, ...: its known labels are compared with the judge's)."),
    out: Path = typer.Option(..., "--out", "-o", help="The preference file to write (JSON Lines, lmforge format)."),
    judge: str = typer.Option(..., "--judge", help="length, reward:DIR, llm:CKPT or verifier:NAME (gsm8k_answer, "
                              "mbpp_tests, doctests, ...)."),
    rubric: Optional[str] = typer.Option(None, "--rubric", help="An LLM judge's instruction: text or a file."),
    constitution: Optional[str] = typer.Option(None, "--constitution", help="Or a constitution (a file, or "
                                               "'default') whose principle's preference question instructs it."),
    principle: Optional[str] = typer.Option(None, "--principle", help="That principle's name (default: the first "
                                            "with a preference question)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Judge only the first N items."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Items per forward (default 8)."),
    tie_margin: Optional[float] = typer.Option(None, "--tie-margin", min=0.0, help="A reward judge's scores this "
                                               "close tie (default 0)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Label every pair of responses with an AI judge (an LLM, a reward model, a verifier or the length baseline),
    writing preference records with their provenance."""
    chosen = {"judge": judge, "rubric": rubric, "constitution": constitution, "principle": principle, "limit": limit,
              "batch_size": batch_size, "tie_margin": tie_margin, "device": device}  # fmt: skip
    cfg = verbs.settings([], {"judge"}, given={"judge": {k: v for k, v in chosen.items() if v is not None}})
    try:
        m = run_judge(items, cfg.judge, out)
    except (FileNotFoundError, ValueError) as e:
        verbs.fail(str(e))
    for line in [*summary(m), f"- preferences in {out}"]:
        log.info("%s", line)


# Not a default stage: it labels the candidates of the pairs stage, which a recipe adds with it.
JUDGE_STAGE = register(Stage(
    name="judge", order=53, run=_judge_stage, sections={"judge": JudgeConfig}, needs=("candidates",),
    produces={"preferences": OUTPUT}, sources=_judge_sources, report=_judge_report, verb=judge_verb, default=False,
))  # fmt: skip


__all__ = ["JudgeConfig", "build_judge", "judge_candidates", "run_judge"]
