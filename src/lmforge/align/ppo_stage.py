"""The ppo stage of a recipe and `lmforge ppo`: the model before it (normally sft/final) tuned with PPO on a prompt
file, scored by a reward model (`ppo.reward_model`: a folder, or "reward" for this run's reward stage) or by
reward functions (`ppo.rewards`), with the held-out prompts' reward before and after.

Held-out prompts are a seeded `ppo.val_fraction` of the file (the same split for the same train.seed): training
never answers them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from lmforge import registry, verbs
from lmforge.align.ppo_config import PPOConfig
from lmforge.align.ppo_train import train_ppo
from lmforge.align.prompts import read_prompts
from lmforge.align.rewards import build_reward
from lmforge.finetune.sft import split_heldout
from lmforge.model.io import require_checkpoint
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt
from lmforge.train.config import ParallelConfig
from lmforge.train.distributed import init_world
from lmforge.train.loop import OUTPUTS

log = logging.getLogger(__name__)

RUN_REWARD_MODEL = "reward"  # ppo.reward_model naming this run's reward stage


def reward_model_path(cfg: PPOConfig, root: Path | None) -> Path | None:
    """The reward model folder `ppo.reward_model` names (None: reward functions score)."""
    if cfg.reward_model != RUN_REWARD_MODEL:
        return Path(cfg.reward_model) if cfg.reward_model else None
    if root is None:
        raise ValueError(f"ppo.reward_model={RUN_REWARD_MODEL!r} names a run's reward stage; outside `lmforge run` "
                         "give the reward model's folder (--reward-model DIR)")  # fmt: skip
    stage = registry.get(RUN_REWARD_MODEL)
    return root / stage.name / stage.produces["reward_model"]


def run_ppo(checkpoint: Path, cfg: PPOConfig, out: Path, parallel: ParallelConfig | None = None,
            root: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Tune `checkpoint` with PPO into out/final/ on `cfg`; the stage's metrics. `lmforge ppo` and the recipe's ppo
    stage both run this (`root`: the run directory, where ppo.reward_model=reward finds the reward stage)."""
    if cfg.prompts is None:
        raise ValueError("ppo.prompts is not set: give a prompt file (lmforge ppo CKPT --prompts FILE)")
    rm_dir = reward_model_path(cfg, root)
    if (rm_dir is None) == (not cfg.rewards):
        raise ValueError("PPO needs exactly one source of scores: ppo.reward_model (--reward-model DIR) or "
                         f"ppo.rewards (--reward NAME=W); got reward_model={cfg.reward_model!r}, "
                         f"rewards={cfg.rewards}")  # fmt: skip
    checkpoint = require_checkpoint(checkpoint)  # before the output folder is made
    world = init_world(parallel or ParallelConfig(), cfg.train.device)
    files = {"checkpoint": inputs_fingerprint(checkpoint), "prompts": inputs_fingerprint(Path(cfg.prompts))}
    if rm_dir is not None:
        files["reward_model"] = inputs_fingerprint(rm_dir)
    # The same job (settings, checkpoint, files) resumes in `out`; a different one starts over.
    start_job(out, "ppo", cfg.semantic(), files, OUTPUTS, world)
    items, skipped = read_prompts(cfg.prompts, cfg.format, cfg.limit)
    if not items:
        raise ValueError(f"no usable prompts in {cfg.prompts} ({skipped.count} records skipped: "
                         f"{skipped.by_reason}; first: {skipped.examples[:3]})")  # fmt: skip
    train_idx, heldout_idx = split_heldout(len(items), cfg.val_fraction, cfg.train.seed)
    log.info("%d prompts: %d for training, %d held out", len(items), len(train_idx), len(heldout_idx))
    reward = build_reward(cfg.rewards, **cfg.reward_options) if cfg.rewards else None
    metrics = train_ppo(
        checkpoint, [items[i] for i in train_idx], [items[i] for i in heldout_idx], out, cfg.train,
        reward_model=rm_dir, reward=reward, rollout_size=cfg.rollout_size, minibatches=cfg.minibatches,
        epochs=cfg.epochs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, kl_coef=cfg.kl_coef,
        target_kl=cfg.target_kl, kl_horizon=cfg.kl_horizon, gamma=cfg.gamma, lam=cfg.lam, cliprange=cfg.cliprange,
        cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef, whiten_rewards=cfg.whiten_rewards,
        max_kl=cfg.max_kl, max_reward=cfg.max_reward, on_blowup=cfg.on_blowup, seed=cfg.train.seed,
        parallel=parallel,
    )  # fmt: skip
    scored_by = str(rm_dir) if rm_dir is not None else ", ".join(f"{k}={v:g}" for k, v in cfg.rewards.items())
    read = {"records": skipped.count, "by_reason": skipped.by_reason, "examples": skipped.examples}
    return {**metrics, "read_skipped": read, "prompts_file": cfg.prompts, "scored_by": scored_by}


def _ppo_stage(ctx: StageContext) -> dict[str, Any]:
    return run_ppo(ctx.input("model"), ctx.settings.ppo, ctx.out, ctx.settings.parallel, ctx.root)


def _sources(settings: Any) -> dict[str, str]:
    """The prompt file and the reward model folder (the run's own too, which the stage does not `need`, since
    reward functions may score instead): a changed one re-runs the stage."""
    cfg = settings.ppo
    found = {"prompts": inputs_fingerprint(Path(cfg.prompts))} if cfg.prompts and Path(cfg.prompts).exists() else {}
    rm_dir = reward_model_path(cfg, settings.run_path)
    if rm_dir is not None and rm_dir.exists():
        found["reward_model"] = inputs_fingerprint(rm_dir)
    return found


def summary(m: dict[str, Any]) -> list[str]:
    """Lines saying what PPO did: the held-out reward before and after, and the last rollout's measures."""
    last = m.get("final_metrics") or {}
    return [
        f"- {m.get('prompts')} training prompts, {m.get('heldout_prompts')} held out ({m.get('skipped_prompts')} "
        f"too long); scored by {m.get('scored_by')}; {m.get('steps')} steps in {fmt(m.get('train_seconds'), '.1f')} s",
        f"- held-out reward: {fmt(m.get('heldout_reward_before'))} before, {fmt(m.get('heldout_reward_after'))} "
        f"after; reply length {fmt(m.get('heldout_length_before'), '.1f')} -> "
        f"{fmt(m.get('heldout_length_after'), '.1f')} tokens",
        f"- last rollout: reward {fmt(last.get('reward'))}, KL to the start model {fmt(last.get('kl'))} nats per "
        f"reply (kl_coef {fmt(last.get('kl_coef'))}), clipped {fmt(last.get('clip_fraction'), '.0%')} of tokens, "
        f"explained variance {fmt(last.get('explained_variance'))}",
    ]


def _ppo_report(ctx: ReportContext) -> list[str]:
    return ["## PPO", "", f"- prompts: {ctx.metrics.get('prompts_file')}", *summary(ctx.metrics), ""]


def parse_rewards(items: list[str]) -> dict[str, float]:
    """`NAME=WEIGHT` options -> {name: weight} (a bare NAME weighs 1)."""
    weights = {}
    for item in items:
        name, _, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            verbs.fail(f"--reward {item!r}: expected NAME=WEIGHT with a number as the weight (ends_turn=1.0)", 2)
    return weights


@verbs.resumable
def ppo_verb(
    checkpoint: Path = typer.Argument(..., help="The policy to start from (normally a fine-tuned one): an lmforge "
                                      "checkpoint or a Hugging Face model directory."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompts: MBPP, GSM8K, messages or prompt records "
                                 "(.json, .jsonl or .jsonl.gz)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes, a "
                             "changed setting, prompt file, checkpoint or reward model starts it over."),
    reward_model: Optional[Path] = typer.Option(None, "--reward-model", help="A reward model folder (lmforge "
                                                "reward's final/) that scores the replies."),
    reward: Optional[List[str]] = typer.Option(None, "--reward", help="A reward function and its weight, "
                                               "NAME=WEIGHT (repeat for a weighted sum): ends_turn, "
                                               "completes_function, code_parses, doctests, mbpp_tests, "
                                               "gsm8k_answer, length."),
    format: Optional[str] = typer.Option(None, "--format", help="mbpp, gsm8k, messages or prompt (default: "
                                         "detected)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read only the first N prompts."),
    overrides: Optional[List[str]] = typer.Argument(None, help="ppo.* and train.* settings (ppo.kl_coef=0.1 "
                                                    "train.max_steps=200 ...); under torchrun, parallel.* settings."),
) -> None:
    """Tune a policy with PPO (a value head on the shared trunk, GAE, clipped policy and value losses, a KL penalty
    to the start model), reporting the held-out prompts' reward before and after."""
    chosen = {"prompts": str(prompts), "reward_model": str(reward_model) if reward_model else None,
              "rewards": parse_rewards(reward) if reward else None, "format": format, "limit": limit}  # fmt: skip
    cfg = verbs.stage_settings("ppo", overrides, chosen, section_overrides=True)
    with verbs.output_checked():
        m = verbs.run_stage(PPO_STAGE, cfg, out, model=checkpoint)
    typer.echo("\n".join([*summary(m), f"policy in {out / 'final'}"]))


# Not a default stage: PPO needs prompts and a reward chosen for them (a recipe adds "ppo" to its stages).
PPO_STAGE = register(Stage(
    name="ppo", order=56, run=_ppo_stage, sections={"ppo": PPOConfig}, needs=("model",), training=True,
    default=False, produces={"model": "final"}, report=_ppo_report, verb=ppo_verb, sources=_sources,
))  # fmt: skip


__all__ = ["run_ppo", "parse_rewards", "reward_model_path"]
