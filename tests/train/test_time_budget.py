"""train.max_time: durations, the lr schedule over the budget, the stop, and exact resume under a driven clock."""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from lmforge.train.config import TrainConfig
from lmforge.train.optim import lr_at

from test_train_loop import config, records, run


class StepClock:
    """A clock that advances one second per reading: the loop reads it once at start and once per step."""

    def __init__(self) -> None:
        self.now = -1.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class FailingLoss:
    """clm_loss until call `fail_at` (1-based), which raises: a crash in the middle of a run."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, model, batch, ctx=None):
        from lmforge.objectives import clm_loss

        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        return clm_loss(model, batch, ctx)


@pytest.mark.parametrize("value, seconds", [(600, 600.0), ("600", 600.0), ("90s", 90.0), ("10m", 600.0),
                                            ("1h30m", 5400.0), ("1.5h", 5400.0), ("2h 5s", 7205.0)])  # fmt: skip
def test_durations_are_read_as_seconds(value, seconds):
    assert TrainConfig(max_time=value).max_time == seconds


@pytest.mark.parametrize("value", ["10x", "", "m", "1m30", 0, -5, "inf"])
def test_bad_durations_are_refused_naming_the_key(value):
    with pytest.raises(ValidationError, match="max_time"):
        TrainConfig(max_time=value)


def test_lr_decay_follows_the_elapsed_share_of_the_budget():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=2, max_steps=10_000, max_time=100, schedule="linear")
    assert [lr_at(0, cfg, 50.0), lr_at(1, cfg, 50.0)] == [0.5, 1.0]  # warmup stays counted in updates
    assert [lr_at(5, cfg, t) for t in (0.0, 25.0, 50.0, 100.0, 130.0)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    cosine = cfg.model_copy(update={"schedule": "cosine"})
    assert lr_at(5, cosine, 50.0) == pytest.approx(0.5) and lr_at(5, cosine, 100.0) == pytest.approx(0.0)
    # Without a budget the elapsed time is ignored: the step schedule of every run so far.
    plain = cfg.model_copy(update={"max_time": None, "max_steps": 12})
    assert lr_at(7, plain, 999.0) == lr_at(7, plain) == 0.5


def test_budget_stops_training_saves_and_reports(tmp_path):
    cfg = config(max_steps=1000, max_time="8s", schedule="linear", min_lr_ratio=0.0, eval_every=5)
    metrics = run(tmp_path, cfg, clock=StepClock())
    assert metrics["steps"] == 8 and metrics["stopped_by"] == "max_time" and metrics["max_time"] == 8.0
    recs = records(tmp_path)
    # Step n starts n-1 seconds in: warmup (2 updates), then lr 1e-2 x (1 - elapsed / 8).
    assert [r["lr"] for r in recs] == pytest.approx([5e-3, 1e-2] + [1e-2 * (1 - t / 8) for t in range(2, 8)])
    assert "val_loss" not in recs[4] and [r["step"] for r in recs if "val_loss" in r] == []  # no val_fn given
    state = json.loads((tmp_path / "checkpoints" / "step_000008" / "trainer_state.json").read_text())["state"]
    assert state["step"] == 8 and state["train_seconds"] == 8.0
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_max_steps_still_caps_a_budgeted_run(tmp_path):
    metrics = run(tmp_path, config(max_steps=5, max_time=3600), clock=StepClock())
    assert metrics["steps"] == 5 and metrics["stopped_by"] == "max_steps"


def test_killed_and_resumed_budgeted_run_matches_an_uninterrupted_one(tmp_path):
    cfg = config(max_steps=1000, max_time=12, ckpt_every=4)
    whole = run(tmp_path / "whole", cfg, clock=StepClock())
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "cut", cfg, loss_fn=FailingLoss(fail_at=7), clock=StepClock())
    resumed = run(tmp_path / "cut", cfg, clock=StepClock())
    assert resumed["resumed_from"] == 4 and resumed["steps"] == whole["steps"] == 12
    assert [r["lr"] for r in records(tmp_path / "cut")] == [r["lr"] for r in records(tmp_path / "whole")]
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Run again once finished: the budget is spent, so no step is added.
    assert run(tmp_path / "cut", cfg, clock=StepClock())["steps"] == 12


RANKS_SCRIPT = """
import json, os, sys
from pathlib import Path

tests = Path(sys.argv[2])
sys.path[:0] = [str(tests), str(tests / "train")]
from test_train_loop import config, run

rank = int(os.environ["RANK"])
ticks = iter(range(0, 10_000, 1 + 2 * rank))  # rank 1's clock runs three times as fast as rank 0's
metrics = run(Path(sys.argv[1]), config(max_steps=1000, max_time=6), clock=lambda: float(next(ticks)))
# One file per rank: the ranks' prints could interleave on the shared stdout.
outcome = {"rank": rank, "steps": metrics["steps"], "stopped_by": metrics["stopped_by"]}
(Path(sys.argv[1]) / f"outcome-{rank}.json").write_text(json.dumps(outcome))
"""


def test_ranks_agree_on_the_schedule_and_the_stop_with_clocks_that_differ(tmp_path):
    """Two gloo ranks read different clocks: both follow rank 0's, stop after the same step and match the lrs of a
    single process reading rank 0's clock."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {
        "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path / "ddp"), str(Path(__file__).parents[1])], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads((tmp_path / "ddp" / f"outcome-{r}.json").read_text()) for r in (0, 1)]
    assert outcomes == [{"rank": r, "steps": 6, "stopped_by": "max_time"} for r in (0, 1)]
    single = run(tmp_path / "single", config(max_steps=1000, max_time=6), clock=StepClock())
    assert [r["lr"] for r in records(tmp_path / "ddp")] == [r["lr"] for r in records(tmp_path / "single")]
    assert single["steps"] == 6
