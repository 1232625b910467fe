"""The training loop's contract (lmforge.losses, lmforge.train.step): a loss returns (loss, metrics), the loop counts
the step's loss tokens and hands them to the loss, averages the metrics over micro-batches and ranks, keeps frozen
models out of the optimizer and the checkpoints, and runs evaluation callbacks.

Run as a script (`python tests/train/test_train_step.py OUT`, under torchrun for several ranks), this file is the worker
of the 2-rank test.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ByteSplit
from lmforge.data.batches import BatchesWrapper
from lmforge.data.loader import BatchLoader
from lmforge.losses import LossContext, ce_loss, label_count
from lmforge.model.transformer import Transformer
from lmforge.objectives import clm_loss
from lmforge.tokenizer import IGNORE_INDEX
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.loop import train
from test_train_loop import SEQ, records, tiny_model


def config(**kw) -> TrainConfig:
    base = dict(seq_len=SEQ, batch_size=8, grad_accum=2, max_steps=4, lr=1e-2, warmup_steps=1, eval_every=1000,
                ckpt_every=1000, threads=1, seed=0, compile=False)  # fmt: skip
    return TrainConfig(**(base | kw))


class MaskedTargets(BatchesWrapper):
    """Windows whose targets divisible by 3 are ignored: every batch, and every rank, has its own count of loss
    tokens, so a per-batch mean and the step's mean per token differ."""

    def __next__(self):
        x, y = next(self.source)
        return x, torch.where(y % 3 == 0, IGNORE_INDEX, y)


class RankedLoss:
    """clm_loss with two metrics: `rank_part` = 10 x rank + the micro-batch's index in its step (so the mean the
    loop must record is known), and `token_share`, this micro-batch's loss tokens as a share of the step's (which
    must average to exactly 1). It also remembers the step's loss-token counts it was given."""

    def __init__(self, rank: int, grad_accum: int) -> None:
        self.rank, self.grad_accum, self.calls, self.seen = rank, grad_accum, 0, []

    def __call__(self, model, batch, ctx=None):
        loss, metrics = clm_loss(model, batch, ctx)
        index = self.calls % self.grad_accum
        self.calls += 1
        self.seen.append(int(ctx.tokens))
        return loss, {**metrics, "rank_part": 10.0 * self.rank + index, "token_share": ctx.mean(label_count(batch[1]))}


def masked_run(out: Path, rank: int = 0, world_size: int = 1, **kw) -> tuple[dict, RankedLoss, BatchLoader]:
    cfg = config(**kw)
    base = BatchLoader(ByteSplit(), SEQ, cfg.batch_size // world_size, cfg.seed, rank=rank, world_size=world_size)
    loss = RankedLoss(rank, cfg.grad_accum)
    return train(tiny_model(), loss, MaskedTargets(base), cfg, out), loss, base


def _worker(out: Path) -> None:
    """One rank of the 2-rank run (torchrun sets the rank); rank 0 writes what train() returned."""
    from lmforge.train.distributed import init_world

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    world = init_world(ParallelConfig(), "cpu")
    result, _, _ = masked_run(out, world.dp_rank, world.dp_size)
    if world.is_main:
        (out / "result.json").write_text(json.dumps(result))


def _unmasked_count(split: ByteSplit, loader: BatchLoader, steps: int, grad_accum: int) -> list[int]:
    """The loss tokens of each step, counted from the data itself."""
    fresh = MaskedTargets(BatchLoader(split, SEQ, loader.batch_size, loader.seed))
    return [sum(int(label_count(next(fresh)[1])) for _ in range(grad_accum)) for _ in range(steps)]


def test_metrics_reach_the_records_and_the_result_averaged_over_micro_batches(tmp_path):
    result, loss, loader = masked_run(tmp_path)
    recs = records(tmp_path)
    counts = _unmasked_count(ByteSplit(), loader, 4, 2)
    assert len(set(counts)) > 1 and counts != [8 * SEQ * 2] * 4  # the masking really varies
    assert loss.seen == [c for c in counts for _ in range(2)]  # the loss got its step's count, not its batch's
    assert [r["loss_tokens"] for r in recs] == counts
    assert all(r["rank_part"] == 0.5 and r["token_share"] == pytest.approx(1.0, abs=1e-6) for r in recs)
    assert result["final_metrics"] == {"rank_part": 0.5, "token_share": recs[-1]["token_share"]}


def test_the_step_loss_is_the_mean_over_its_loss_tokens_however_they_are_split(tmp_path):
    """One micro-batch of 8 rows and two of 4 train the same weights: each micro-batch's loss is its share of the
    step's tokens, not its own mean (with means, unevenly masked micro-batches would weigh differently)."""
    whole_model, split_model = tiny_model(), tiny_model()
    for model, out, kw in ((whole_model, "whole", dict(batch_size=8, grad_accum=1)),
                           (split_model, "split", dict(batch_size=4, grad_accum=2))):  # fmt: skip
        cfg = config(max_steps=3, **kw)
        loader = MaskedTargets(BatchLoader(ByteSplit(), SEQ, cfg.batch_size, cfg.seed))
        train(model, clm_loss, loader, cfg, tmp_path / out)
    a, b = records(tmp_path / "whole"), records(tmp_path / "split")
    assert [r["loss_tokens"] for r in a] == [r["loss_tokens"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    for name, p in whole_model.state_dict().items():
        torch.testing.assert_close(p, split_model.state_dict()[name], rtol=0, atol=1e-6)


def _free_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    # The worker is this file run as a script: it imports tests/helpers.py from the tests folder.
    tests = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "400", "PYTHONPATH": path}


def test_two_gloo_ranks_record_the_mean_of_their_metrics_and_the_single_process_loss(tmp_path):
    """The issue's check: each rank returns different metric values; metrics.jsonl and what train() returns (what
    the stage's manifest keeps) hold their mean over both ranks and both micro-batches, and the loss, normalised
    by the loss tokens of both ranks, is the one-process loss."""
    one, _, _ = masked_run(tmp_path / "one")
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(two)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env=_free_env())  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    ra, rb = records(tmp_path / "one"), records(two)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]  # one record per step: rank 0 writes
    for x, y in zip(ra, rb):
        assert y["rank_part"] == (0 + 1 + 10 + 11) / 4  # ranks 0 and 1, micro-batches 0 and 1
        assert y["token_share"] == pytest.approx(1.0, abs=1e-6)
        assert y["loss_tokens"] == x["loss_tokens"]  # the same global batch, counted over both ranks
        assert abs(y["loss"] - x["loss"]) < 1e-5
    result = json.loads((two / "result.json").read_text())
    assert result["final_metrics"]["rank_part"] == 5.5 and one["final_metrics"]["rank_part"] == 0.5
    assert result["world_size"] == 2
    assert "rank_part 5.5" in done.stdout  # the progress line shows the loss's metrics


class ReferenceKL:
    """A loss that reads a frozen reference (as DPO or distillation would): clm plus a small pull towards the
    reference's logits, and the reference's own loss as a metric."""

    def __init__(self) -> None:
        self.reference_modes: list[bool] = []

    def __call__(self, model, batch, ctx=None):
        reference = ctx.frozen["reference"]
        self.reference_modes.append(reference.training)
        x, y = batch
        logits = model(x)
        with torch.no_grad():
            ref_logits = reference(x)
        loss, _ = ce_loss(logits, y, ctx)
        pull = ((logits.float() - ref_logits.float()) ** 2).mean()
        ref_share, _ = ce_loss(ref_logits, y, ctx)
        return loss + 1e-3 * pull, {"reference_loss": ctx.mean(ref_share * ctx.tokens)}


def test_a_frozen_reference_reaches_the_loss_and_stays_out_of_optimizer_and_checkpoint(tmp_path):
    from lmforge.train.checkpoint import load_latest_training_checkpoint
    from lmforge.train.optim import build_optimizer

    def run(out: Path, model: Transformer, loss=None, steps: int = 6) -> dict:
        cfg = config(max_steps=steps, ckpt_every=3)
        loader = BatchLoader(ByteSplit(), SEQ, cfg.batch_size, cfg.seed)
        return train(model, loss or ReferenceKL(), loader, cfg, out, frozen={"reference": reference})

    reference = tiny_model(seed=5).train()
    before = copy.deepcopy(reference.state_dict())
    loss = ReferenceKL()
    model = tiny_model()
    metrics = run(tmp_path / "ref", model, loss)
    assert loss.reference_modes and not any(loss.reference_modes)  # eval mode for the loss
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(torch.equal(p, before[k]) for k, p in reference.state_dict().items())  # never trained
    assert "reference_loss" in records(tmp_path / "ref")[0] and metrics["final_metrics"]["reference_loss"] > 0
    # Not in the checkpoint: its files hold the trained model's tensors and optimizer state only.
    ckpt = tmp_path / "ref" / "checkpoints" / "step_000006"
    assert set(load_file(ckpt / "model.safetensors")) == set(model.state_dict())
    fresh = tiny_model()  # the optimizer state of the trained model alone loads strictly
    state = load_latest_training_checkpoint(tmp_path / "ref", fresh, build_optimizer(fresh, config()),
                                            BatchLoader(ByteSplit(), SEQ, 8, 0))  # fmt: skip
    assert state.step == 6

    # A crash after the step-3 checkpoint, then the same call again: bit-identical to the uninterrupted run.
    class Crash(Exception):
        pass

    inner = ReferenceKL()

    def crash_at_step_5(model, batch, ctx=None):
        if len(inner.reference_modes) == 8:  # steps 1-4 done, two micro-batches each
            raise Crash
        return inner(model, batch, ctx)

    with pytest.raises(Crash):
        run(tmp_path / "run", tiny_model(), crash_at_step_5)
    resumed = tiny_model(seed=9)
    assert run(tmp_path / "run", resumed)["resumed_from"] == 3
    assert all(torch.equal(p, model.state_dict()[k]) for k, p in resumed.state_dict().items())
    with pytest.raises(ValueError, match="frozen model 'reference' shares parameters"):
        train(model, clm_loss, BatchLoader(ByteSplit(), SEQ, 8, 0), config(), tmp_path / "x", frozen={
            "reference": model})  # fmt: skip


def test_callbacks_run_at_eval_every_and_join_the_records(tmp_path):
    seen = []

    def sample_lengths(model, step):
        seen.append((step, model.training, torch.is_grad_enabled()))
        return {"sample_tokens": 10.0 * step}

    cfg = config(max_steps=5, eval_every=2)
    loader = BatchLoader(ByteSplit(), SEQ, cfg.batch_size, cfg.seed)
    metrics = train(tiny_model(), clm_loss, loader, cfg, tmp_path, callbacks=[sample_lengths])
    assert seen == [(2, False, False), (4, False, False), (5, False, False)]  # eval mode, no gradients
    assert [r.get("sample_tokens") for r in records(tmp_path)] == [None, 20.0, None, 40.0, 50.0]
    assert metrics["final_eval_metrics"] == {"sample_tokens": 50.0}

    def clashing(model, step):
        return {"loss": 1.0}

    with pytest.raises(ValueError, match=r"callback returned metrics named \['loss'\]"):
        train(tiny_model(), clm_loss, BatchLoader(ByteSplit(), SEQ, 8, 0), config(max_steps=1), tmp_path / "b",
              callbacks=[clashing])  # fmt: skip


def test_the_contract_is_checked_with_clear_errors(tmp_path):
    class Plain:
        def __next__(self):
            return None

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(TypeError, match=r"not a batch source .* lacks \['loss_tokens'\]"):
        train(tiny_model(), clm_loss, Plain(), config(), tmp_path / "a")

    calls = []

    def changing(model, batch, ctx=None):  # step 1 reports "a", step 2 "b"
        calls.append(1)
        loss, _ = clm_loss(model, batch, ctx)
        return loss, {"a": 1.0} if len(calls) <= 2 else {"b": 1.0}

    with pytest.raises(ValueError, match=r"returned the metrics \['b'\], but \['a'\] at the first step"):
        train(tiny_model(), changing, BatchLoader(ByteSplit(), SEQ, 4, 0), config(), tmp_path / "b")
    with pytest.raises(ValueError, match=r"loss returned metrics named \['grad_norm'\]"):
        train(tiny_model(), lambda m, b, ctx: (clm_loss(m, b, ctx)[0], {"grad_norm": 0.0}),
              BatchLoader(ByteSplit(), SEQ, 8, 0), config(), tmp_path / "c")  # fmt: skip


def test_loss_context_shares_and_means():
    ctx = LossContext(tokens=torch.tensor(40), parts=4)
    assert ctx.share(torch.tensor(20.0)).item() == 0.5  # half of the step's summed loss
    assert ctx.mean(torch.tensor(10.0)).item() == 1.0  # 10 of 40 tokens, averaged over 4 parts: 10 / 40
    assert LossContext.local(torch.tensor(0)).share(torch.tensor(0.0)).item() == 0.0  # no NaN for no tokens
    per = ctx.per_micro_batch(5)  # a mixture: this micro-batch's own mean, one part of four
    assert per.share(torch.tensor(10.0)).item() == 0.5 and per.mean(torch.tensor(5.0)).item() == 1.0


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_the_spike_guard_judges_only_losses_whose_running_mean_is_positive():
    """A cross-entropy 10x its running mean is a spike; an RL surrogate loss (PPO, GRPO) averages near or below 0,
    where a ratio says nothing, so it is never skipped for one (non-finite losses still are)."""
    from lmforge.train.checkpoint import TrainerState
    from lmforge.train.step import GUARD_WARMUP, _bad_step_reason

    positive = TrainerState(good_steps=GUARD_WARMUP, loss_mean=0.5)
    assert "running mean" in _bad_step_reason(6.0, 1.0, positive, 10.0)
    assert _bad_step_reason(4.0, 1.0, positive, 10.0) is None
    for mean in (-0.02, 0.0):
        around_zero = TrainerState(good_steps=GUARD_WARMUP, loss_mean=mean)
        assert _bad_step_reason(0.3, 1.0, around_zero, 10.0) is None
        assert "non-finite" in _bad_step_reason(float("nan"), 1.0, around_zero, 10.0)
