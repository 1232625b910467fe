"""The grpo stage of a recipe and `lmforge grpo`: GRPO with verifiable rewards from the model before it (normally
sft/final), with greedy replies to held-out prompts checked before and after.

Prompts are the sft stage's docstring pairs by default (`grpo.prompts: docstring_pairs`: training prompts from
curate/train, held-out ones from curate/val, chosen exactly as the sft stage chooses the prompts of its generation
check, so the "before" here is sft's "after"), or a prompts file (MBPP, GSM8K, messages or prompt records). The
check decodes greedily up to `grpo.gen_tokens` tokens: the share of replies that end their turn, for code prompts
the share that also complete a function which parses, and the held-out reward.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import typer
from torch import nn

from lmforge import verbs
from lmforge.align.grpo import Reward, encode_prompts, greedy_samples, train_grpo
from lmforge.align.grpo_config import GRPOConfig
from lmforge.align.guards import RLGuard
from lmforge.align.prompts import PromptItem, docstring_prompts, read_prompts
from lmforge.align.rewards import build_reward, chrf, gsm8k_answer
from lmforge.finetune.code_pairs import completes_function
from lmforge.finetune.config import SFTConfig
from lmforge.finetune.sft import split_heldout
from lmforge.finetune.stage import DOCSTRING_PAIRS, _spread, docstring_pairs
from lmforge.model.io import load_checkpoint_tokenizer, load_model, read_model_args, require_checkpoint
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt
from lmforge.stats import proportion
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import ParallelConfig
from lmforge.train.distributed import init_world
from lmforge.train.loop import OUTPUTS

log = logging.getLogger(__name__)

SHOWN_SAMPLES = 3  # held-out replies before and after, in the report


def grpo_prompts(cfg: GRPOConfig, curate_dir: Path | None, tok: Tokenizer,
                 max_seq_len: int) -> tuple[list[PromptItem], list[PromptItem], dict[str, Any]]:  # fmt: skip
    """(training prompts, held-out prompts, read counts) for the settings."""
    if cfg.prompts == DOCSTRING_PAIRS:
        if curate_dir is None:
            raise ValueError("grpo.prompts=docstring_pairs derives its prompts from a run's curated code; give a "
                             "prompts file instead (lmforge grpo CKPT --prompts FILE)")  # fmt: skip
        # The sft stage's own derivation, with its defaults for the held-out pairs.
        sft = SFTConfig(max_pairs=cfg.max_prompts, train={"seq_len": max_seq_len, "seed": cfg.train.seed})
        train_pairs, heldout_pairs, counts = docstring_pairs(curate_dir, tok, sft)
        return docstring_prompts(train_pairs), docstring_prompts(heldout_pairs), counts
    items, skipped = read_prompts(cfg.prompts, cfg.format, cfg.limit)
    counts: dict[str, Any] = {"skipped_records": skipped.count, "skipped_examples": skipped.examples[:5]}
    if cfg.heldout_prompts is not None:
        heldout, held_skipped = read_prompts(cfg.heldout_prompts, cfg.format, cfg.limit)
        counts["skipped_records"] += held_skipped.count
        return items, heldout, counts
    if not items:
        raise ValueError(f"no usable prompts in {cfg.prompts} ({skipped.count} records skipped)")
    if cfg.val_fraction == 0:
        return items, [], counts
    keep, held = split_heldout(len(items), cfg.val_fraction, cfg.train.seed)
    return [items[i] for i in keep], [items[i] for i in held], counts


def greedy_check(model: nn.Module, tok: Tokenizer, items: list[PromptItem], ids: list[list[int]], reward: Reward,
                 gen_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Greedy replies to the held-out prompts: the share that end their turn, for code prompts the share that
    also complete a function which parses, for prompts with a reference body the mean chrF to it (whatever the
    rewards: a reply that games them shows here), their mean reward and length, and the first replies."""
    samples = greedy_samples(model, tok, items, ids, gen_tokens)
    totals, _ = reward(samples)
    result: dict[str, Any] = {"ended_turn": float(np.mean([s.ended for s in samples])),
                              "reward": float(np.mean(totals)),
                              "mean_new_tokens": float(np.mean([s.tokens for s in samples])),
                              "replies": [s.completion for s in samples[:SHOWN_SAMPLES]]}  # fmt: skip
    if all("code_prompt" in it.meta for it in items):
        result["completes_function"] = float(np.mean([s.ended and completes_function(s.prompt.meta["code_prompt"],
                                                                                      s.completion) for s in samples]))
    if all("reference" in it.meta for it in items):
        result["reference_similarity"] = float(np.mean([chrf(s.completion, s.prompt.meta["reference"])
                                                         for s in samples]))  # fmt: skip
    if all("answer" in it.meta for it in items):
        # GSM8K's score, whatever the rewards: exact final-answer matches, with the Wilson interval a small n needs.
        result["exact_match"] = proportion(sum(gsm8k_answer()(samples)), len(samples))
    return result


def run_grpo(checkpoint: Path, curate_dir: Path | None, cfg: GRPOConfig, out: Path,
             parallel: ParallelConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """GRPO-train `checkpoint` into out/final/ on `cfg`; the stage's metrics. `lmforge grpo` and the recipe's grpo
    stage both run this."""
    checkpoint = require_checkpoint(checkpoint)  # before the output folder is made
    world = init_world(parallel or ParallelConfig(), cfg.train.device)
    pairs = cfg.prompts == DOCSTRING_PAIRS
    inputs = {"checkpoint": inputs_fingerprint(checkpoint),
              "data": inputs_fingerprint(curate_dir if pairs and curate_dir else Path(cfg.prompts))}  # fmt: skip
    if cfg.heldout_prompts is not None:
        inputs["heldout"] = inputs_fingerprint(Path(cfg.heldout_prompts))
    start_job(out, "grpo", cfg.semantic(), inputs, OUTPUTS, world)
    tok, max_seq_len = load_checkpoint_tokenizer(checkpoint), read_model_args(checkpoint).max_seq_len
    train_items, heldout, counts = grpo_prompts(cfg, curate_dir, tok, max_seq_len)
    held_items, held_ids = encode_prompts(tok, heldout, max_seq_len, cfg.gen_tokens, "grpo.gen_tokens")
    held_items, held_ids = _spread(held_items, cfg.heldout_size), _spread(held_ids, cfg.heldout_size)
    reward = build_reward(cfg.rewards, **cfg.reward_options)
    before = None
    if held_items:
        log.info("greedy replies to %d held-out prompts before GRPO...", len(held_items))
        before = greedy_check(load_model(checkpoint, device=world.device)[0], tok, held_items, held_ids, reward,
                              cfg.gen_tokens)  # fmt: skip

    def after_training(model: nn.Module) -> dict[str, Any]:
        return {"check_after": greedy_check(model, tok, held_items, held_ids, reward, cfg.gen_tokens)} if before else {}

    guard = RLGuard("grpo", max_kl=cfg.max_kl, max_reward=cfg.max_reward, on_blowup=cfg.on_blowup)
    metrics = train_grpo(checkpoint, train_items, held_items, reward, out, cfg.train, group_size=cfg.group_size,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.beta,
                         epsilon=cfg.epsilon, iterations=cfg.iterations, scale_rewards=cfg.scale_rewards,
                         seed=cfg.train.seed, parallel=parallel, guard=guard,
                         after_training=after_training)  # fmt: skip
    return {**metrics, **counts, "check_before": before, "prompts_source": cfg.prompts, "rewards": cfg.rewards,
            "group_size": cfg.group_size}  # fmt: skip


def _grpo_stage(ctx: StageContext) -> dict[str, Any]:
    return run_grpo(ctx.input("model"), ctx.inputs.get("curated"), ctx.settings.grpo, ctx.out, ctx.settings.parallel)


def _pct(value: Any) -> str:
    return fmt(value, ".0%")


def summary(m: dict[str, Any]) -> list[str]:
    """What GRPO changed: the training reward, and the greedy held-out check before and after."""
    final = m.get("final_metrics") or {}
    rewards = " + ".join(f"{w:g} x {name}" for name, w in (m.get("rewards") or {}).items())
    lines = [f"- reward: {rewards}; {m.get('prompts')} training prompts x {m.get('group_size')} replies; "
             f"{m.get('steps')} steps in {fmt(m.get('train_seconds'), '.1f')} s",
             f"- last step: training reward {fmt(final.get('reward'), '.3f')}, reply length "
             f"{fmt(final.get('response_length'), '.1f')} tokens, ended turn {_pct(final.get('ended_turn'))}"
             + (f", KL to the reference {fmt(final.get('kl'), '.4f')}" if "kl" in final else "")]  # fmt: skip
    before, after = m.get("check_before") or {}, m.get("check_after") or {}
    if before:
        n = m.get("heldout_prompts")
        lines += [f"- greedy replies to {n} held-out prompts that end their turn: {_pct(before.get('ended_turn'))} "
                  f"before, {_pct(after.get('ended_turn'))} after",
                  f"- held-out reward: {fmt(before.get('reward'), '.3f')} before, {fmt(after.get('reward'), '.3f')} "
                  f"after; mean reply {fmt(before.get('mean_new_tokens'), '.1f')} -> "
                  f"{fmt(after.get('mean_new_tokens'), '.1f')} tokens"]  # fmt: skip
    if "completes_function" in before:
        lines.append(f"- replies that end their turn and complete a function which parses: "
                     f"{_pct(before['completes_function'])} before, {_pct(after.get('completes_function'))} after")
    if "reference_similarity" in before:
        lines.append(f"- similarity of the replies to the held-out functions' own bodies (chrF): "
                     f"{fmt(before['reference_similarity'], '.3f')} before, "
                     f"{fmt(after.get('reference_similarity'), '.3f')} after")
    if "exact_match" in before:
        lines.append(f"- held-out exact final answers: {_share(before['exact_match'])} before, "
                     f"{_share(after.get('exact_match'))} after")
    return lines


def _share(p: dict[str, Any] | None) -> str:
    """A proportion as "k/n = 2.5% [0.9%, 7.1%]" (Wilson 95%)."""
    if not p:
        return "-"
    lo, hi = p["ci95"]
    return f"{round(p['value'] * p['n'])}/{p['n']} = {fmt(p['value'], '.1%')} [{fmt(lo, '.1%')}, {fmt(hi, '.1%')}]"


def _grpo_report(ctx: ReportContext) -> list[str]:
    lines = ["## Alignment (GRPO)", "", f"- prompts: {ctx.metrics.get('prompts_source')}", *summary(ctx.metrics), ""]
    before, after = ctx.metrics.get("check_before") or {}, ctx.metrics.get("check_after") or {}
    for i, (b, a) in enumerate(zip(before.get("replies", []), after.get("replies", [])), start=1):
        lines += [f"### GRPO sample {i}", "", "Before:", "", "```python", b, "```", "", "After:", "", "```python", a,
                  "```", ""]  # fmt: skip
    return lines


@verbs.resumable
def grpo_verb(
    checkpoint: Path = typer.Argument(..., help="The model to start from (normally a fine-tuned one): an lmforge "
                                      "checkpoint or a Hugging Face model directory."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts: MBPP, GSM8K, messages or prompt "
                                           "records (.json, .jsonl)."),
    curated: Optional[Path] = typer.Option(None, "--curated", help="Instead of --prompts: a run's curate/ folder, "
                                           "whose docstring pairs give the prompts as in the recipe's grpo stage."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes, a "
                             "changed setting, prompts file or checkpoint starts it over."),
    reward: Optional[List[str]] = typer.Option(None, "--reward", help="NAME=WEIGHT, repeatable (default "
                                               "completes_function=1): ends_turn, completes_function, code_parses, "
                                               "doctests, mbpp_tests, gsm8k_answer, length, "
                                               "reference_similarity."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out prompts; without it, --val-fraction "
                                           "of --prompts is held out."),
    format: Optional[str] = typer.Option(None, "--format", help="mbpp, gsm8k, messages or prompt (default: "
                                         "detected)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read only the first N prompts of each file."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", min=0.0, max=0.9,
                                                 help="Share of --prompts held out (default 0.1)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="grpo.* and train.* settings (grpo.group_size=8, "
                                                    "train.max_steps=50 ...); under torchrun, parallel.* settings."),
) -> None:
    """Train with GRPO: G sampled replies per prompt, rewards from plain functions, group-normalised advantages,
    a clipped token-level loss and an optional KL to the reference; greedy held-out replies checked before and
    after."""
    if (prompts is None) == (curated is None):
        verbs.fail("give either --prompts FILE or --curated DIR (a run's curate/ folder, for its docstring pairs)", 2)
    weights: dict[str, float] = {}
    for item in reward or []:
        name, sep, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            verbs.fail(f"--reward {item!r}: expected NAME=WEIGHT with a number, e.g. completes_function=1", 2)
    chosen = {"prompts": str(prompts) if prompts else DOCSTRING_PAIRS,
              "heldout_prompts": str(heldout) if heldout else None, "format": format, "limit": limit,
              "val_fraction": val_fraction, "rewards": weights or None}  # fmt: skip
    cfg = verbs.stage_settings("grpo", overrides, chosen, section_overrides=True)
    with verbs.output_checked():
        m = verbs.run_stage(GRPO_STAGE, cfg, out, model=checkpoint, curated=curated)
    for line in [*summary(m), f"- model in {out / 'final'}"]:
        log.info("%s", line)  # through the log, as rank 0 alone reports under torchrun


# Not a default stage: it needs a model that already follows the chat template (the default recipe lists it after
# sft).
GRPO_STAGE = register(Stage(
    name="grpo", order=57, run=_grpo_stage, sections={"grpo": GRPOConfig}, needs=("model", "curated"), training=True,
    default=False, produces={"model": "final"}, report=_grpo_report, verb=grpo_verb,
))  # fmt: skip
