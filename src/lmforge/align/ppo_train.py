"""PPO training with the one loop: a rollout buffer as the batch source, lmforge.align.ppo's loss, `train_ppo`.

`PPOBatches` is an endless, resumable batch source. When it has no rollout pending it makes one from the live
policy: `rollout_size` prompts (visited in seeded shuffled epochs), one reply each (align.rollout.sample_rollout,
seeded by the run's seed, the rollout number and each prompt's index), the old log-probs and values of the
policy at that moment, the reference's log-probs (a frozen copy of the start model), the scores (a reward model
or reward functions), the per-token rewards with the KL penalty, GAE advantages whitened over the rollout and the
returns. It then yields the rollout `epochs` times in `minibatches` shuffled minibatches, each split into
`train.grad_accum` micro-batches: one optimizer step of the loop is one minibatch, and the next rollout is made when
the last minibatch of the last epoch has been taken. Its state is JSON (the rollout number, the minibatch cursor,
the KL coefficient and the pending rollout's tensors as lists of numbers), so a run killed between two minibatches
of a rollout resumes bit for bit.

Under several ranks every rank makes the whole rollout (the policies are identical, the seeds the same) and trains
on its own rows of every minibatch: the advantages are whitened over the same rollout one process whitens over,
and the steps match one process.

    out_dir/final/      the tuned policy as a plain checkpoint (load_model; the value head is dropped)
    out_dir/checkpoints the live policy + value head, which the loop resumes from
"""

from __future__ import annotations

import copy
import filecmp
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.align.guards import RLGuard
from lmforge.align.ppo import (
    AdaptiveKL,
    PolicyWithValue,
    PPOLoss,
    explained_variance,
    gae,
    last_positions,
    token_rewards,
    whiten,
)
from lmforge.align.prompts import PromptItem
from lmforge.align.reward_model import load_reward_model, score_conversations, score_ids
from lmforge.align.rewards import Sample
from lmforge.align.rollout import Rollout, logits_token_stats, prompt_seed, sample_rollout, token_logps
from lmforge.data.batches import count_labels
from lmforge.finetune.data import Message, Skipped
from lmforge.finetune.template import prompt_ids, render
from lmforge.io import staged_dir
from lmforge.model.io import TOKENIZER, load_checkpoint_tokenizer, load_model, write_model_files
from lmforge.model.modes import evaluating
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed import init_world
from lmforge.train.loop import FINAL_DIR, train
from lmforge.train.precision import autocast_context

log = logging.getLogger(__name__)

TENSORS = {"input_ids": torch.long, "labels": torch.long, "old_logps": torch.float32, "old_values": torch.float32,
           "advantages": torch.float32, "returns": torch.float32}  # fmt: skip
SCORE_CHUNK = 16  # rows per forward when a rollout is scored
HELDOUT_ROLLOUT = 2**31 - 1  # the rollout number that seeds the held-out replies (no training rollout reaches it)
# (scores [N], {reward name: per-row values}) of a rollout's replies, given the prompt of each row
Scorer = Callable[[Rollout, Sequence[PromptItem]], tuple[Tensor, dict[str, list[float]]]]


@dataclass(frozen=True)
class RolloutPlan:
    """How rollouts are drawn and cut into minibatches."""

    rollout_size: int  # prompts (= replies) per rollout
    minibatches: int  # optimizer steps per pass over a rollout
    epochs: int  # passes over each rollout
    micro_batches: int  # train.grad_accum: micro-batches per minibatch
    max_new_tokens: int
    temperature: float
    gamma: float
    lam: float
    whiten_rewards: bool
    seed: int
    precision: str = "fp32"  # train.precision: the rollout's log-probs are taken under the loss's autocast

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches

    def check(self, world_size: int) -> None:
        parts = self.minibatches * self.micro_batches * world_size
        if min(self.rollout_size, self.minibatches, self.epochs, self.micro_batches) < 1 or self.rollout_size % parts:
            raise ValueError(f"ppo.rollout_size={self.rollout_size} must split evenly into ppo.minibatches="
                             f"{self.minibatches} x train.grad_accum={self.micro_batches} x {world_size} rank(s); "
                             f"use a multiple of {parts}")  # fmt: skip


class PPOBatches:
    """The rollout buffer the loop trains from (see the module docstring)."""

    def __init__(self, model: PolicyWithValue, reference: nn.Module, tok: Tokenizer, prompts: Sequence[list[int]],
                 items: Sequence[PromptItem], scorer: Scorer, plan: RolloutPlan, kl: AdaptiveKL,
                 guard: RLGuard | None = None, rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        if not prompts:
            raise ValueError("no prompts to make rollouts from")
        plan.check(world_size)
        self.model, self.reference, self.tok, self.scorer = model, reference, tok, scorer
        self.prompts, self.items, self.plan, self.kl, self.guard = list(prompts), list(items), plan, kl, guard
        self.rank, self.world_size = rank, world_size
        self.rollout = -1  # the number of the pending rollout (or of the last one made)
        self.cursor = 0  # the next micro-batch of the pending rollout
        self.pending: dict[str, Any] | None = None

    def __iter__(self) -> PPOBatches:
        return self

    def _micro_rows(self, cursor: int) -> Tensor:
        """This rank's rows of micro-batch `cursor` of the pending rollout."""
        plan = self.plan
        per_epoch = plan.minibatches * plan.micro_batches
        epoch, within = divmod(cursor, per_epoch)
        order = np.random.default_rng((plan.seed, self.rollout, epoch)).permutation(plan.rollout_size)
        size = plan.rollout_size // per_epoch
        rows = order[within * size : (within + 1) * size]
        share = size // self.world_size
        return torch.from_numpy(rows[self.rank * share : (self.rank + 1) * share].copy()).long()

    def __next__(self) -> dict[str, Any]:
        if self.pending is None:
            self.rollout, self.cursor = self.rollout + 1, 0
            self.pending = self._make_rollout()
        rows = self._micro_rows(self.cursor)
        batch = {name: self.pending[name][rows] for name in TENSORS}
        batch["stats"] = {name: torch.tensor(value) for name, value in self.pending["stats"].items()}
        self.cursor += 1
        if self.cursor == self.plan.steps_per_rollout * self.plan.micro_batches:
            self.pending = None
        return batch

    def _prompt_indices(self) -> list[int]:
        """The prompts of the current rollout: positions [k R, (k + 1) R) of the prompts' seeded epochs."""
        n, size = len(self.prompts), self.plan.rollout_size
        orders: dict[int, np.ndarray] = {}
        out = []
        for position in range(self.rollout * size, (self.rollout + 1) * size):
            epoch, i = divmod(position, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng((self.plan.seed, epoch)).permutation(n)
            out.append(int(orders[epoch][i]))
        return out

    @torch.no_grad()
    def _make_rollout(self) -> dict[str, Any]:
        plan, index = self.plan, self._prompt_indices()
        seed = prompt_seed(plan.seed, self.rollout)
        rollout = sample_rollout(self.model.policy, self.tok, [self.prompts[i] for i in index], index, 1,
                                 plan.max_new_tokens, plan.temperature, seed)  # fmt: skip
        logps, values, ref_logps = self._token_stats(rollout)
        mask = rollout.labels != IGNORE_INDEX
        scores, parts = self.scorer(rollout, [self.items[i] for i in index])
        kl_coef = self.kl.value
        rewards = token_rewards(scores, logps, ref_logps, mask, kl_coef)
        if plan.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, plan.gamma, plan.lam)
        kl = float(((logps - ref_logps) * mask).sum(1).mean())
        stats = {"reward": float(scores.mean()), "kl": kl, "kl_coef": kl_coef,
                 "response_length": float(mask.sum(1).float().mean()),
                 "ended_turn": float(np.mean(rollout.ended)),
                 "explained_variance": explained_variance(values, returns, mask),
                 **{f"reward/{name}": float(np.mean(v)) for name, v in parts.items()}}  # fmt: skip
        self.kl.update(kl, plan.rollout_size)
        if self.guard is not None:
            self.guard.check(self.rollout * plan.steps_per_rollout + 1, stats)
        return {"input_ids": rollout.ids, "labels": rollout.labels, "old_logps": logps, "old_values": values,
                "advantages": whiten(advantages, mask), "returns": returns, "stats": stats}  # fmt: skip

    def _token_stats(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """The policy's log-probs and values and the reference's log-probs [N, T] of the rollout, in eval mode."""
        device = next(self.model.parameters()).device
        logps, values, ref_logps = [], [], []
        # The loss's autocast too, so that before any update the ratio is 1 up to batch-shape rounding.
        with evaluating(self.model), autocast_context(device, self.plan.precision):
            for start in range(0, len(rollout.ids), SCORE_CHUNK):
                ids = rollout.ids[start : start + SCORE_CHUNK].to(device)
                labels = rollout.labels[start : start + SCORE_CHUNK].to(device)
                logits, value = self.model(ids)
                logps.append(logits_token_stats(logits, labels, self.plan.temperature)[0].cpu())
                values.append((value * (labels != IGNORE_INDEX)).cpu())
                ref_logps.append(token_logps(self.reference, ids, labels, self.plan.temperature).cpu())
        return torch.cat(logps), torch.cat(values), torch.cat(ref_logps)

    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self.pending is not None:
            pending = {name: self.pending[name].tolist() for name in TENSORS}
            pending["stats"] = dict(self.pending["stats"])
        return {"rollout": self.rollout, "cursor": self.cursor, "kl_coef": self.kl.value, "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollout, self.cursor, self.kl.value = int(state["rollout"]), int(state["cursor"]), float(state["kl_coef"])
        pending = state.get("pending")
        self.pending = None
        if pending is not None:
            self.pending = {name: torch.tensor(pending[name], dtype=dtype) for name, dtype in TENSORS.items()}
            self.pending["stats"] = dict(pending["stats"])

    def loss_tokens(self, batch: Any) -> int:
        return count_labels(batch)


def reward_fn_scorer(reward: Callable[[Sequence[Sample]], tuple[list[float], dict[str, list[float]]]]) -> Scorer:
    """Scores from reward functions (align.rewards.build_reward): each reply as a Sample of its prompt."""

    def score(rollout: Rollout, items: Sequence[PromptItem]) -> tuple[Tensor, dict[str, list[float]]]:
        rows = zip(items, rollout.texts, rollout.ended, rollout.replies)
        samples = [Sample(prompt=item, completion=text, ended=ended, tokens=len(reply))
                   for item, text, ended, reply in rows]  # fmt: skip
        totals, parts = reward(samples)
        return torch.tensor(totals, dtype=torch.float32), {name: list(v) for name, v in parts.items()}

    return score


def reward_model_scorer(directory: Path, checkpoint: Path, device: str | torch.device = "cpu") -> Scorer:
    """Scores from the reward model in `directory`: on the rollout's own tokens when it shares the policy's
    tokenizer (score_ids), else on the conversations re-rendered with its own template (score_conversations)."""
    rm = load_reward_model(directory, device)
    rm_tok = load_checkpoint_tokenizer(directory)
    same = filecmp.cmp(Path(checkpoint) / TOKENIZER, Path(directory) / TOKENIZER, shallow=False)
    log.info("reward model %s scores %s", directory, "the rollout's tokens" if same else "re-rendered conversations "
             "(its tokenizer differs from the policy's)")  # fmt: skip
    turn_end = template_turn_end(rm_tok)

    def score(rollout: Rollout, items: Sequence[PromptItem]) -> tuple[Tensor, dict[str, list[float]]]:
        if same:
            ends = (last_positions(rollout.labels != IGNORE_INDEX) + 2).tolist()  # through the last labelled token
            # An ended reply closes as the template closes a turn (as the reward model was trained); a reply cut at
            # max_new_tokens is scored as cut.
            seqs = [row[: end - 1] + turn_end if ended else row[:end]
                    for row, end, ended in zip(rollout.ids.tolist(), ends, rollout.ended)]  # fmt: skip
            return score_ids(rm, seqs, rm_tok.pad_id), {}
        convs = [[*item.messages, Message("assistant", text)] for item, text in zip(items, rollout.texts)]
        scores, _, skipped = score_conversations(rm, rm_tok, convs)
        if skipped.count:
            raise ValueError(f"the reward model in {directory} could not score {skipped.count} replies "
                             f"({'; '.join(skipped.examples)}); give it prompts that fit its max_seq_len")  # fmt: skip
        return scores, {}

    return score


def template_turn_end(tok: Tokenizer) -> list[int]:
    """The tokens the chat template renders from a reply's end of turn on (lmforge's template: `<|end|>` and EOS;
    ChatML: `<|im_end|>` and a newline): what a rendered conversation, and so a reward model, ends with."""
    ids, labels = render(tok, [Message("user", "x"), Message("assistant", "x")], "last")
    start = next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)
    stops = set(tok.stop_ids)
    end = next((j for j in range(start, len(ids)) if ids[j] in stops), None)
    if end is None:
        raise ValueError("the chat template ends an assistant turn with none of the tokenizer's stop tokens "
                         f"{sorted(stops)}; a reward model cannot score the rollout's tokens")  # fmt: skip
    return ids[end:]


def encode_prompts(tok: Tokenizer, items: Sequence[PromptItem], room: int) -> tuple[list[list[int]], list[PromptItem],
                                                                                   Skipped]:  # fmt: skip
    """The chat template's prompt ids of each item that leaves `room` tokens of context for its reply; the others
    are skipped and counted at their source."""
    ids, kept, skipped = [], [], Skipped()
    for i, item in enumerate(items):
        prompt = prompt_ids(tok, item.messages)
        if len(prompt) > room:
            skipped.add(str(item.meta.get("source", f"prompt[{i}]")),
                        f"prompt too long: {len(prompt)} tokens leave no room for the reply")  # fmt: skip
            continue
        ids.append(prompt)
        kept.append(item)
    return ids, kept, skipped


def train_ppo(checkpoint: Path, prompts: Sequence[PromptItem], heldout_prompts: Sequence[PromptItem], out_dir: Path,
              train_cfg: TrainConfig, *, reward_model: Path | None = None, reward: Any = None, rollout_size: int = 16,
              minibatches: int = 2, epochs: int = 2, max_new_tokens: int = 32, temperature: float = 1.0,
              kl_coef: float = 0.05, target_kl: float | None = None, kl_horizon: int = 10000, gamma: float = 1.0,
              lam: float = 0.95, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
              whiten_rewards: bool = False, max_kl: float | None = None, max_reward: float | None = None,
              on_blowup: str = "stop", seed: int = 0,
              parallel: ParallelConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """Tune `checkpoint` with PPO on `prompts` (align.prompts.PromptItem), scored by the reward model folder
    `reward_model` or the reward functions `reward` (align.rewards.build_reward; exactly one of the two), and
    write `out_dir/final/`. `heldout_prompts` (may be empty) are answered and scored at every train.eval_every
    steps (`heldout_reward`, `heldout_response_length`) and before training. Returns the loop's metrics and the
    held-out figures before and after."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if (reward_model is None) == (reward is None):
        raise ValueError("PPO needs exactly one source of scores: a reward model folder (ppo.reward_model, "
                         "--reward-model DIR) or reward functions (ppo.rewards, --reward NAME=W)")  # fmt: skip
    world = init_world(parallel or ParallelConfig(), train_cfg.device)
    if world.distributed and (world.pp_size > 1 or (parallel and parallel.data != "ddp")):
        raise ValueError("PPO runs data parallel with parallel.data=ddp only (no fsdp or pipeline): every rank "
                         "generates the whole rollout with the whole policy")  # fmt: skip
    plan = RolloutPlan(rollout_size, minibatches, epochs, train_cfg.grad_accum, max_new_tokens, temperature, gamma,
                       lam, whiten_rewards, seed, train_cfg.precision)  # fmt: skip
    plan.check(world.dp_size)
    policy, args = load_model(checkpoint, dtype=torch.float32)  # fp32 master weights
    reference = copy.deepcopy(policy).to(world.device).eval().requires_grad_(False)
    tok = load_checkpoint_tokenizer(checkpoint)
    room = args.max_seq_len - max_new_tokens
    train_ids, train_items, skipped = encode_prompts(tok, prompts, room)
    heldout_ids, heldout_items, heldout_skipped = encode_prompts(tok, heldout_prompts, room)
    if skipped.count + heldout_skipped.count:
        log.warning("%d prompts skipped (%s)", skipped.count + heldout_skipped.count,
                    "; ".join(skipped.examples + heldout_skipped.examples))  # fmt: skip
    if not train_ids:
        raise ValueError(f"no prompt leaves room for ppo.max_new_tokens={max_new_tokens} reply tokens in the "
                         f"model's max_seq_len={args.max_seq_len} ({skipped.count} skipped)")  # fmt: skip
    scorer = (reward_model_scorer(Path(reward_model), checkpoint, world.device) if reward_model is not None
              else reward_fn_scorer(reward))  # fmt: skip
    model = PolicyWithValue(policy)
    guard = RLGuard("ppo", max_kl, max_reward, on_blowup, kl_setting="kl_coef")  # without limits it still stops a non-finite KL or reward
    source = PPOBatches(model, reference, tok, train_ids, train_items, scorer, plan,
                        AdaptiveKL(kl_coef, target_kl, kl_horizon), guard, world.dp_rank, world.dp_size)  # fmt: skip

    def heldout(*_: Any) -> dict[str, float]:  # a loop callback (model, step): it answers with `model` itself
        index = list(range(len(heldout_ids)))
        rollout = sample_rollout(model.policy, tok, heldout_ids, index, 1, max_new_tokens, temperature,
                                 prompt_seed(seed, HELDOUT_ROLLOUT))  # fmt: skip
        scores, _ = scorer(rollout, heldout_items)
        return {"heldout_reward": float(scores.mean()),
                "heldout_response_length": float(np.mean([len(r) for r in rollout.replies]))}  # fmt: skip

    before = heldout() if heldout_ids else {}
    loss = PPOLoss(temperature, cliprange, cliprange_value, vf_coef)
    metrics = train(model, loss, source, train_cfg, out_dir, callbacks=[heldout] if heldout_ids else [],
                    parallel=parallel)  # fmt: skip
    if world.is_main:  # the loop's final/ holds the live module; the run's result is the plain policy
        with staged_dir(out_dir / FINAL_DIR) as tmp:
            write_model_files(model.policy, args, tmp, checkpoint / TOKENIZER)
    after = metrics.get("final_eval_metrics") or {}
    return {**metrics, "prompts": len(train_ids), "heldout_prompts": len(heldout_ids),
            "skipped_prompts": skipped.count + heldout_skipped.count,
            "heldout_reward_before": before.get("heldout_reward"), "heldout_reward_after": after.get("heldout_reward"),
            "heldout_length_before": before.get("heldout_response_length"),
            "heldout_length_after": after.get("heldout_response_length")}  # fmt: skip


__all__ = ["PPOBatches", "RolloutPlan", "train_ppo", "reward_fn_scorer", "reward_model_scorer", "encode_prompts"]
