"""GRPO (Shao et al. 2024, DeepSeekMath) on the one training loop: a batch source that samples, a loss that clips.

Each micro-batch is a rollout of the live policy (lmforge.align.rollout): `group_size` replies to each of its
prompts, scored by a reward (lmforge.align.rewards), with the group-normalised advantage of reply i of a group,
`(r_i - mean(r)) / (std(r) + eps)` (sample std, as TRL; `scale_rewards=False` keeps `r_i - mean(r)`, which Dr. GRPO
argues does not favour groups of nearly equal rewards). The batch carries the log-probs of the sampling policy
(`old_logps`, for the clipped ratio) and, with a reference, the reference's (`ref_logps`).

The loss is token-level (DAPO): over every reply token of the step, all micro-batches and ranks together (the
loop's `ctx.tokens`, the batch source counting reply tokens),
`-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * k3(policy, reference)`,
`ratio = exp(logp - old_logp)`. With `iterations` > 1 every rollout is trained on that many optimizer steps in a row
(the ratio then moves away from 1 and the clip matters); with 1, the ratio is exactly 1 and the loss is the plain
policy gradient of the advantages.

A rollout is drawn when the step that uses it begins, so it is on-policy; its seed comes from (seed, rollout
number, prompt index) and its prompts from a (seed, epoch)-shuffled order, so the state is a few integers (and the
pending rollouts while a rollout is being re-used) and a resumed or multi-rank run samples what one uninterrupted
process samples. The guard (lmforge.align.guards) checks every rollout's reward and KL to the reference, summed
over the ranks, so every rank stops at the same step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.align.guards import RLGuard
from lmforge.align.losses import kl_per_token
from lmforge.align.prompts import PromptItem
from lmforge.align.rewards import Sample
from lmforge.align.rollout import logits_token_stats, prompt_seed, sample_rollout
from lmforge.data.batches import ShuffledRows, count_labels
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import generate
from lmforge.losses import LossContext, LossResult, label_count
from lmforge.model.io import TOKENIZER, load_checkpoint_tokenizer, load_model, write_model_files
from lmforge.model.modes import evaluating
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed import check_batch, init_world
from lmforge.train.loop import train
from lmforge.train.precision import autocast_context

log = logging.getLogger(__name__)

ADVANTAGE_EPS = 1e-4  # keeps a group of equal rewards at advantage 0 (TRL's value)
SCORE_ROWS = 16  # rows per forward when scoring a rollout without gradients
Reward = Callable[[Sequence[Sample]], tuple[list[float], Mapping[str, list[float]]]]


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: bool = True) -> Tensor:
    """Per-reply advantages [N] from rewards [N] in groups of `group_size` consecutive replies to one prompt."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of group_size={group_size} (at least 2)")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards:
        centred = centred / (groups.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return centred.reshape(-1)


def encode_prompts(tok: Tokenizer, items: Sequence[PromptItem], max_seq_len: int, max_new_tokens: int,
                   setting: str = "max_new_tokens") -> tuple[list[PromptItem], list[list[int]]]:  # fmt: skip
    """The prompts whose template rendering leaves room for max_new_tokens, and their ids; the others are counted
    and logged (naming `setting`), never silently dropped."""
    kept, ids = [], []
    for item in items:
        p = prompt_ids(tok, item.messages)
        if len(p) + max_new_tokens <= max_seq_len:
            kept.append(item)
            ids.append(p)
    if len(kept) < len(items):
        log.warning("%d of %d prompts leave no room for %s=%d in the model's %d-token context: skipped",
                    len(items) - len(kept), len(items), setting, max_new_tokens, max_seq_len)  # fmt: skip
    return kept, ids


def _samples(items: Sequence[PromptItem], index: Sequence[int], texts: Sequence[str], ended: Sequence[bool],
             replies: Sequence[Sequence[int]]) -> list[Sample]:  # fmt: skip
    return [Sample(prompt=items[i], completion=t, ended=e, tokens=len(r))
            for i, t, e, r in zip(index, texts, ended, replies)]  # fmt: skip


def _tensors_to_json(batch: Mapping[str, Tensor]) -> dict[str, Any]:
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "data": v.tolist()} for k, v in batch.items()}


def _tensors_from_json(state: Mapping[str, Any]) -> dict[str, Tensor]:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])) for k, v in state.items()}


class GRPOBatches:
    """Endless, resumable GRPO micro-batches: each one rollout of `batch_size / world_size` prompts (this rank's
    share of a global `batch_size`) times `group_size` replies. `loss_tokens` is a batch's reply tokens."""

    def __init__(self, policy: nn.Module, tok: Tokenizer, items: Sequence[PromptItem], prompts: Sequence[list[int]],
                 reward: Reward, *, batch_size: int, group_size: int, max_new_tokens: int, temperature: float,
                 scale_rewards: bool = True, iterations: int = 1, grad_accum: int = 1, seed: int = 0,
                 reference: nn.Module | None = None, guard: RLGuard | None = None, rank: int = 0,
                 world_size: int = 1, precision: str = "fp32") -> None:  # fmt: skip
        if not prompts or len(prompts) != len(items):
            raise ValueError(f"{len(prompts)} encoded prompts for {len(items)} prompt items: need as many, at least 1")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} prompts must split evenly over {world_size} ranks")
        if iterations < 1:
            raise ValueError(f"iterations={iterations}: each rollout is trained on at least once")
        self.policy, self.tok, self.items, self.prompts, self.reward = policy, tok, list(items), list(prompts), reward
        self.group_size, self.max_new_tokens, self.temperature = group_size, max_new_tokens, temperature
        self.scale_rewards, self.iterations, self.grad_accum, self.seed = scale_rewards, iterations, grad_accum, seed
        self.reference, self.guard, self.world_size, self.precision = reference, guard, world_size, precision
        self.order = ShuffledRows(len(prompts), batch_size // world_size, seed, rank, world_size, carry_over=True)
        self.rollouts = 0  # rollouts drawn so far (the seed's rollout number)
        self.served = 0  # micro-batches handed out so far
        self.pending: list[dict[str, Tensor]] = []  # this cycle's rollouts, re-used `iterations` times

    def __iter__(self) -> GRPOBatches:
        return self

    @property
    def _cycle(self) -> int:
        return self.grad_accum * self.iterations

    def __next__(self) -> dict[str, Tensor]:
        if self.served % self._cycle == 0:
            self.pending = [self._rollout() for _ in range(self.grad_accum)]
            self._check(self.served // self.grad_accum + 1)
        batch = self.pending[self.served % self.grad_accum]
        self.served += 1
        return batch

    @torch.no_grad()
    def _rollout(self) -> dict[str, Tensor]:
        rows = [int(i) for i in self.order._next_rows()]
        seed = prompt_seed(self.seed, self.rollouts)
        self.rollouts += 1
        r = sample_rollout(self.policy, self.tok, [self.prompts[i] for i in rows], rows, self.group_size,
                           self.max_new_tokens, self.temperature, seed)  # fmt: skip
        samples = _samples(self.items, [rows[i] for i in r.prompt_index], r.texts, r.ended, r.replies)
        totals, parts = self.reward(samples)
        rewards = torch.tensor(totals, dtype=torch.float32)
        batch = {"input_ids": r.ids, "labels": r.labels, "rewards": rewards,
                 "advantages": group_advantages(rewards, self.group_size, self.scale_rewards),
                 "ended": torch.tensor(r.ended, dtype=torch.float32),
                 "lengths": torch.tensor([len(x) for x in r.replies], dtype=torch.float32)}  # fmt: skip
        for name, values in parts.items():
            batch[f"reward/{name}"] = torch.tensor(values, dtype=torch.float32)
        with evaluating(self.policy):
            batch["old_logps"] = self._score(self.policy, r.ids, r.labels)
        if self.reference is not None:
            batch["ref_logps"] = self._score(self.reference, r.ids, r.labels)
        return batch

    def _score(self, model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
        """Log-probs [N, T] of the labelled tokens, SCORE_ROWS rows at a time (a full-vocabulary tensor each), under
        the loss's autocast (train.precision), so that a fresh rollout's ratio is 1 up to batch-shape rounding."""
        device = next(model.parameters()).device
        with autocast_context(device, self.precision):
            parts = [logits_token_stats(model(ids[i : i + SCORE_ROWS].to(device)),
                                        labels[i : i + SCORE_ROWS].to(device), self.temperature)[0].cpu()
                     for i in range(0, len(ids), SCORE_ROWS)]  # fmt: skip
        return torch.cat(parts)

    def _check(self, step: int) -> None:
        """The guard on this cycle's rollouts: mean reward per reply and k3 KL per reply token, over all ranks."""
        if self.guard is None:
            return
        sums = torch.zeros(4, dtype=torch.float64)
        for b in self.pending:
            mask = b["labels"] != IGNORE_INDEX
            sums[0] += b["rewards"].double().sum()
            sums[1] += b["rewards"].numel()
            if "ref_logps" in b:
                sums[2] += (kl_per_token(b["old_logps"], b["ref_logps"]) * mask).double().sum()
            sums[3] += mask.sum()
        if self.world_size > 1 and dist.is_initialized():  # on the policy's device: NCCL reduces CUDA tensors only
            reduced = sums.to(next(self.policy.parameters()).device)
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        measures = {"reward": float(sums[0] / sums[1])}
        if self.reference is not None:
            measures["kl"] = float(sums[2] / sums[3].clamp(min=1))
        self.guard.check(step, measures)

    def loss_tokens(self, batch: Mapping[str, Tensor]) -> int:
        return count_labels(batch)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"order": self.order.state_dict(), "rollouts": self.rollouts, "served": self.served}
        if self.served % self._cycle:  # mid-cycle: the rollouts still to be re-used were drawn by older weights
            state["pending"] = [_tensors_to_json(b) for b in self.pending]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
        self.rollouts, self.served = int(state["rollouts"]), int(state["served"])
        self.pending = [_tensors_from_json(b) for b in state.get("pending", [])]
        if self.served % self._cycle and len(self.pending) != self.grad_accum:
            raise ValueError(f"GRPO loader state at micro-batch {self.served} holds {len(self.pending)} pending "
                             f"rollouts, expected {self.grad_accum}: it was saved with other grad_accum or "
                             "iterations settings")  # fmt: skip


def grpo_loss(model: nn.Module, batch: Mapping[str, Tensor], ctx: LossContext | None = None, *, epsilon: float = 0.2,
              beta: float = 0.0, temperature: float = 1.0) -> LossResult:  # fmt: skip
    """The clipped, token-level GRPO loss of one micro-batch (see the module docstring) and its metrics: `reward`,
    `reward/<name>`, `response_length`, `ended_turn` (means per reply), `entropy`, `clip_fraction` (the share of
    reply tokens whose clipped term won, so they get no gradient) and, with a reference, `kl` (k3, per token)."""
    labels = batch["labels"]
    mask = (labels != IGNORE_INDEX).float()
    ctx = ctx or LossContext.local(label_count(labels))
    logps, entropy = logits_token_stats(model(batch["input_ids"]), labels, temperature)
    ratio = torch.exp(logps - batch["old_logps"])
    adv = batch["advantages"][:, None].to(logps.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.minimum(unclipped, clipped)
    # The first three reach the progress line.
    metrics: dict[str, Any] = {"reward": batch["rewards"].mean(), "ended_turn": batch["ended"].mean(),
                               "response_length": batch["lengths"].mean()}  # fmt: skip
    if "ref_logps" in batch:
        kl = kl_per_token(logps, batch["ref_logps"], "k3")
        if beta:
            per_token = per_token + beta * kl
        metrics["kl"] = ctx.mean((kl.detach() * mask).sum())
    loss = ctx.share((per_token * mask).sum())
    was_clipped = (clipped < unclipped).float() * mask
    metrics["entropy"] = ctx.mean((entropy.detach() * mask).sum())
    metrics["clip_fraction"] = ctx.mean(was_clipped.sum())
    metrics.update({k: v.mean() for k, v in batch.items() if k.startswith("reward/")})
    return loss, metrics


@torch.no_grad()
def greedy_samples(model: nn.Module, tok: Tokenizer, items: Sequence[PromptItem], prompts: Sequence[list[int]],
                   max_new_tokens: int) -> list[Sample]:  # fmt: skip
    """Greedy replies to the prompts as reward samples (a reply ended when it stopped on a stop token)."""
    stops = frozenset(tok.stop_ids)
    with evaluating(model):
        outs = generate(model, [list(p) for p in prompts], max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids,
                        include_stop=True)  # fmt: skip
    ended = [bool(o) and o[-1] in stops for o in outs]
    replies = [o[:-1] if e else o for o, e in zip(outs, ended)]
    texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
    return _samples(items, range(len(items)), texts, ended, replies)


def heldout_reward(model: nn.Module, tok: Tokenizer, items: Sequence[PromptItem], prompts: Sequence[list[int]],
                   reward: Reward, max_new_tokens: int) -> dict[str, float]:  # fmt: skip
    """The reward of greedy replies to held-out prompts and their mean length: next to the training reward, a
    reward that climbs only in training (or replies that grow) shows reward hacking."""
    samples = greedy_samples(model, tok, items, prompts, max_new_tokens)
    totals, _ = reward(samples)
    return {"heldout_reward": sum(totals) / len(totals),
            "heldout_response_length": sum(s.tokens for s in samples) / len(samples)}  # fmt: skip


def train_grpo(checkpoint: Path, prompts: Sequence[PromptItem], heldout_prompts: Sequence[PromptItem],
               reward: Reward, out_dir: Path, train_cfg: TrainConfig, *, group_size: int = 8,
               max_new_tokens: int = 96, temperature: float = 1.0, beta: float = 0.0, epsilon: float = 0.2,
               iterations: int = 1, scale_rewards: bool = True, seed: int = 0, parallel: ParallelConfig | None = None,
               guard: RLGuard | None = None,
               after_training: Callable[[nn.Module], dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """GRPO-train `checkpoint` on `prompts` (`train_cfg.batch_size` prompts x `group_size` replies per micro-batch)
    into out_dir/final/, with the reward of greedy replies to `heldout_prompts` at every eval_every steps. A
    reference model is loaded when the loss (beta > 0) or the guard (max_kl) needs it. `after_training(model)`
    runs on the trained model and its dict joins the metrics."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    world = init_world(parallel or ParallelConfig(), train_cfg.device)
    if world.distributed and (world.pp_size > 1 or (parallel and parallel.data != "ddp")):
        raise ValueError("GRPO runs data parallel with parallel.data=ddp only: every rank samples with the whole "
                         "policy")  # fmt: skip
    check_batch(train_cfg, world)
    model, args = load_model(checkpoint, device=world.device, dtype=torch.float32)  # fp32 master weights
    tok = load_checkpoint_tokenizer(checkpoint)
    items, ids = encode_prompts(tok, prompts, args.max_seq_len, max_new_tokens)
    held_items, held_ids = encode_prompts(tok, heldout_prompts, args.max_seq_len, max_new_tokens)
    if not items:
        raise ValueError(f"none of the {len(prompts)} prompts fits the model's {args.max_seq_len}-token context "
                         f"with max_new_tokens={max_new_tokens}: lower it")  # fmt: skip
    reference = None
    if beta > 0 or (guard is not None and guard.max_kl is not None):
        reference = load_model(checkpoint, device=world.device, dtype=torch.float32)[0].eval().requires_grad_(False)
    loader = GRPOBatches(model, tok, items, ids, reward, batch_size=train_cfg.batch_size, group_size=group_size,
                         max_new_tokens=max_new_tokens, temperature=temperature, scale_rewards=scale_rewards,
                         iterations=iterations, grad_accum=train_cfg.grad_accum, seed=seed, reference=reference,
                         guard=guard, rank=world.dp_rank, world_size=world.dp_size,
                         precision=train_cfg.precision)  # fmt: skip
    loss = functools.partial(grpo_loss, epsilon=epsilon, beta=beta, temperature=temperature)

    def heldout(_wrapped: nn.Module, _step: int) -> dict[str, float]:
        # Samples with the plain module (in its own eval mode), whatever wrapper the loop trains.
        return heldout_reward(model, tok, held_items, held_ids, reward, max_new_tokens)

    tokenizer_path = checkpoint / TOKENIZER
    metrics = train(model, loss, loader, train_cfg, out_dir, parallel=parallel,
                    write_model_files=lambda m, d: write_model_files(m, args, d, tokenizer_path),
                    callbacks=[heldout] if held_items else ())  # fmt: skip
    extra = after_training(model) if after_training else {}
    return {**metrics, **extra, "prompts": len(items), "heldout_prompts": len(held_items),
            "skipped_prompts": len(prompts) - len(items) + len(heldout_prompts) - len(held_items),
            "reference": reference is not None}  # fmt: skip
