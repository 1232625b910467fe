"""A run interrupted at any point and resumed ends with exactly the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import argparse, os, sys, time
    from pathlib import Path

    import numpy as np
    import torch

    from lmforge.data.loader import BatchLoader
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.objectives import clm_loss
    from lmforge.model.config import ModelConfig
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import train


    class ByteSplit:
        def __init__(self):
            self.tokens = np.frombuffer(Path(argparse.__file__).read_bytes(), dtype=np.uint8).astype(np.int64)
            self.n_tokens = len(self.tokens)

        def slice(self, start, stop):
            return self.tokens[start:stop]


    delay = float(os.environ.get("STEP_DELAY", "0"))


    def slow_loss(model, batch, ctx=None):
        # Stretches the run so the parent can kill it mid-way; sleeping touches no RNG or tensor.
        time.sleep(delay)
        x, y = batch
        # Random target dropout makes the run depend on the torch RNG state being restored too.
        return clm_loss(model, (x, torch.where(torch.rand(y.shape) < 0.9, y, -100)), ctx)


    out = Path(sys.argv[1])
    cfg = TrainConfig(seq_len=32, batch_size=4, grad_accum=2, max_steps=40, lr=1e-2, warmup_steps=5,
                      ckpt_every=10, keep_last=2, threads=1, seed=3)
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelArgs.from_config(ModelConfig(depth=2, d_model=32, max_seq_len=32), 256))
    loader = BatchLoader(ByteSplit(), cfg.seq_len, cfg.batch_size, cfg.seed)
    train(model, slow_loss, loader, cfg, out)
    """
)


def launch(script: Path, out: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, STEP_DELAY=str(delay))
    return subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output.decode()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    reference = launch(script, tmp_path / "reference", delay=0.0)
    victim = launch(script, tmp_path / "killed", delay=0.02)
    ckpt = tmp_path / "killed" / "checkpoints" / "step_000020"
    deadline = time.monotonic() + 60
    while not ckpt.exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no step_000020 checkpoint within 60 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stdout.close()
    finish(reference)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()

    finish(launch(script, tmp_path / "killed", delay=0.0))

    assert_same_weights(tmp_path / "reference" / "final" / "model.safetensors",
                        tmp_path / "killed" / "final" / "model.safetensors")  # fmt: skip
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_weights(tmp_path / "reference" / "checkpoints" / "step_000040" / name,
                            tmp_path / "killed" / "checkpoints" / "step_000040" / name)  # fmt: skip
    resumed, reference = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("killed", "reference")
    )
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


@pytest.mark.parametrize("crash_at_call", [23, 32])
def test_crash_mid_run_then_resume_in_process(tmp_path, crash_at_call):
    """An exception inside a step (call 32 is the last micro-batch of checkpoint step 16) stands in for a kill."""
    from test_train_loop import ByteSplit, FaultyLoss, config, records, tiny_model

    from lmforge.data.loader import BatchLoader
    from lmforge.train.loop import train

    class Crash(Exception):
        pass

    def crashing(model, batch, ctx=None):
        loss = base(model, batch, ctx)
        if base.calls == crash_at_call:
            raise Crash
        return loss

    cfg = config(max_steps=24, batch_size=4, grad_accum=2, ckpt_every=8, keep_last=1)
    reference = tiny_model()
    train(reference, FaultyLoss({}), BatchLoader(ByteSplit(), 32, 4, 0), cfg, tmp_path / "ref")
    base = FaultyLoss({})
    with pytest.raises(Crash):
        train(tiny_model(), crashing, BatchLoader(ByteSplit(), 32, 4, 0), cfg, tmp_path / "run")
    resumed = tiny_model(seed=99)  # its initial weights must not matter: the checkpoint replaces them
    metrics = train(resumed, FaultyLoss({}), BatchLoader(ByteSplit(), 32, 4, 0), cfg, tmp_path / "run")
    assert metrics["resumed_from"] == 8 * ((crash_at_call - 1) // 16)
    for name, p in reference.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 25))
    assert [r["loss"] for r in records(tmp_path / "run")] == [r["loss"] for r in records(tmp_path / "ref")]
