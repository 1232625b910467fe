"""Kill `lmforge run` with SIGKILL in the middle of pre-training; running it again resumes to the same weights."""

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmforge.pipeline import run_recipe
from lmforge.recipe import load_recipe

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SETTINGS = [
    f"data.source={STDLIB / 'json'}", "data.val_fraction=0.3", "tokenizer.vocab_size=400", "model.depth=1",
    "model.d_model=64", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=4", "train.max_steps=60",
    "train.warmup_steps=5", "train.compile=false", "train.eval_every=20", "train.eval_batches=1", "train.ckpt_every=10",
    "stages=[curate, tokenizer, shards, pretrain]", "name=kill",
]  # fmt: skip


def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "lmforge.cli", "run", *SETTINGS, f"run_dir={killed}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = killed / "kill" / "pretrain" / "checkpoints" / "step_000020"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "the run never reached its second checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "kill" / "pretrain" / "final").exists(), "killed too late to test resuming"

    outcomes = {o.stage: o.action for o in run_recipe(load_recipe(None, SETTINGS + [f"run_dir={killed}"]))}
    assert outcomes == {"curate": "skipped", "tokenizer": "skipped", "shards": "skipped", "pretrain": "resumed"}
    run_recipe(load_recipe(None, SETTINGS + [f"run_dir={clean}"]))

    resumed = load_file(killed / "kill" / "pretrain" / "final" / "model.safetensors")
    reference = load_file(clean / "kill" / "pretrain" / "final" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    steps = (killed / "kill" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 60, "the log reads as one clean run: one record per step"
