"""Distributed training on 2 CPU processes (gloo), launched the way users launch it: torchrun + `lmforge pretrain`.

Every multi-process run is compared with one process training on the same global batch: the loss of every step,
the validation losses and the final weights must agree (to float reduction order).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import json_package_run
from lmforge.data.readers import stdlib_root
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed import World, check_batch, init_world
from lmforge.train.pipelining import StageModule, build_pipeline, stage_layers

STEPS = 20
COMMON = ["model.depth=2", "model.d_model=64", "train.seq_len=64", "train.batch_size=8", f"train.max_steps={STEPS}",
          "train.warmup_steps=2", "train.eval_every=10", "train.eval_batches=1", "train.ckpt_every=10",
          "train.compile=false"]  # fmt: skip
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return json_package_run(tmp_path_factory.mktemp("dist"))


def _command(data: Path, out: Path, nproc: int, overrides: list[str]) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "lmforge.cli", "pretrain", str(data / "shards"), "-t",
            str(data / "tokenizer" / "tokenizer.json"), "-o", str(out), *COMMON, *overrides]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "400"  # log lines unwrapped, so the assertions can find whole messages
    return env


def pretrain(data: Path, out: Path, nproc: int = 1, *overrides: str) -> subprocess.CompletedProcess:
    """Run `lmforge pretrain` (under torchrun when nproc > 1); the result's stdout holds all output."""
    result = subprocess.run(_command(data, out, nproc, list(overrides)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600, env=_env())  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    return result


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, from_step: int = 1) -> None:
    ra, rb = records(a), records(b)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))  # one record per step: only rank 0 writes
    for x, y in zip(ra[from_step - 1 :], rb[from_step - 1 :]):
        assert abs(x["loss"] - y["loss"]) < TOL, (x["step"], x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), x["step"]
        assert ("val_loss" in x) == ("val_loss" in y)
        if "val_loss" in x:
            assert abs(x["val_loss"] - y["val_loss"]) < TOL
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One-process reference runs, one per optimizer, made on first use."""
    runs: dict[str, Path] = {}

    def get(optimizer: str) -> Path:
        if optimizer not in runs:
            out = tmp_path_factory.mktemp("single") / optimizer
            pretrain(data, out, 1, f"train.optimizer={optimizer}")
            runs[optimizer] = out
        return runs[optimizer]

    return get


@pytest.mark.parametrize("optimizer,layout", [
    ("adamw", ["parallel.data=ddp"]),
    ("muon", ["parallel.data=ddp", "train.grad_accum=2"]),
    ("adamw", ["parallel.data=fsdp"]),
    ("muon", ["parallel.data=fsdp"]),
    ("adamw", ["parallel.pipeline=2", "parallel.schedule=gpipe"]),
    ("muon", ["parallel.pipeline=2", "parallel.schedule=1f1b", "parallel.microbatches=4"]),
])  # fmt: skip
def test_two_ranks_follow_the_single_process_loss_curve(data, single, tmp_path, optimizer, layout):
    if "train.grad_accum=2" in layout:
        # The reference must take the same global batch: 2 micro-batches of 8 rows.
        ref = tmp_path / "ref"
        pretrain(data, ref, 1, f"train.optimizer={optimizer}", "train.grad_accum=2")
    else:
        ref = single(optimizer)
    out = tmp_path / "two"
    result = pretrain(data, out, 2, f"train.optimizer={optimizer}", *layout)
    assert_same_run(ref, out)
    # Rank 0 reports; the other rank stays quiet unless something is wrong.
    assert "[rank 0]" in result.stdout and "[rank 1]" not in result.stdout
    ckpt = out / "checkpoints" / f"step_{STEPS:06d}"
    assert (ckpt / "dcp").is_dir() and (ckpt / "model.safetensors").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world"]["world_size"] == 2


def test_pipeline_stages_compose_with_sharded_data_parallelism_on_four_ranks(data, single, tmp_path):
    """2 stages x 2 FSDP replicas; its checkpoint then finishes the run in one process."""
    ref = single("muon")
    four = tmp_path / "four"
    pretrain(data, four, 4, "train.optimizer=muon", "parallel.pipeline=2", "parallel.data=fsdp")
    assert_same_run(ref, four)
    _resume_from_step_10(four, tmp_path / "one")
    pretrain(data, tmp_path / "one", 1, "train.optimizer=muon")
    assert_same_run(ref, tmp_path / "one", from_step=11)


def _resume_from_step_10(src: Path, dst: Path) -> None:
    """Copy a finished run and roll it back to its step-10 checkpoint, as if it had died right after it."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    shutil.rmtree(dst / "checkpoints" / f"step_{STEPS:06d}")


@pytest.mark.parametrize("layout", [["parallel.data=ddp"], ["parallel.data=fsdp"], ["parallel.pipeline=2"]])
def test_a_checkpoint_written_by_two_ranks_resumes_in_one_process(data, single, tmp_path, layout):
    ref = single("muon")
    two = tmp_path / "two"
    pretrain(data, two, 2, "train.optimizer=muon", *layout)
    _resume_from_step_10(two, tmp_path / "one")
    result = pretrain(data, tmp_path / "one", 1, "train.optimizer=muon")
    assert "resuming from" in result.stdout and "written by 2 ranks" in result.stdout
    assert_same_run(ref, tmp_path / "one", from_step=11)


@pytest.mark.parametrize("layout", [["parallel.data=fsdp"], ["parallel.pipeline=2"]])
def test_a_single_process_checkpoint_resumes_on_two_ranks(data, single, tmp_path, layout):
    ref = single("muon")
    _resume_from_step_10(ref, tmp_path / "two")
    pretrain(data, tmp_path / "two", 2, "train.optimizer=muon", *layout)
    assert_same_run(ref, tmp_path / "two", from_step=11)
    # The single-process checkpoint gained a distributed copy; its own files are untouched.
    step10 = tmp_path / "two" / "checkpoints" / "step_000010"
    assert (step10 / "dcp").is_dir() and (step10 / "optimizer.safetensors").is_file()


def test_a_killed_distributed_job_resumes_to_the_same_weights(data, tmp_path):
    # 60 steps, so that the kill lands well before the end however fast the machine is.
    settings = ["parallel.data=fsdp", "train.max_steps=60", "train.eval_every=30"]
    clean = tmp_path / "clean"
    pretrain(data, clean, 2, *settings)
    killed = tmp_path / "killed"
    job = subprocess.Popen(_command(data, killed, 2, settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=_env(), start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step_000010").is_dir():
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before its step-10 checkpoint"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    job.wait()
    assert not (killed / "final").exists()
    result = pretrain(data, killed, 2, *settings)
    assert "resuming from" in result.stdout
    a, b = load_file(clean / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same world, same reduction order: bit-identical
    assert [r["step"] for r in records(killed)] == list(range(1, 61))


def _rank_pids(launcher: subprocess.Popen, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of the workers a torchrun process started."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "RANK" in env and "lmforge.cli" in " ".join(child.cmdline()):
                found[int(env["RANK"])] = child.pid
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun did not start 2 workers")


def _wait_for_training(out: Path, launcher: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and len(records(out)) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


def test_torchrun_ends_the_job_when_a_rank_is_killed(data, tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen(_command(data, out, 2, ["train.max_steps=100000", "train.eval_every=100000"]),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())  # fmt: skip
    ranks = _rank_pids(job)
    _wait_for_training(out, job)
    os.kill(ranks[1], signal.SIGKILL)
    output, _ = job.communicate(timeout=60)
    assert job.returncode != 0
    assert "rank      : 1" in output and "SIGKILL" in output  # torchrun names the rank that died and how


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_ends_its_peer_with_a_clear_error(data, tmp_path, how):
    """Without torchrun's agent watching (as across nodes), rank 0 itself notices: at once when its peer's
    connection drops, within parallel.timeout_s when the peer stops answering."""
    out = tmp_path / "run"
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
    cmd = _command(data, out, 1, ["train.max_steps=100000", "train.eval_every=100000", "parallel.timeout_s=5"])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]  # fmt: skip
    try:
        _wait_for_training(out, procs[0])
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        output, _ = procs[0].communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    assert "error: rank 0 of 2:" in output and "another rank stopped answering" in output
    assert "Rerun the same command to resume" in output
    if how == "hung":
        assert "within parallel.timeout_s=5 s" in output and waited < 30


def test_stages_split_blocks_evenly_with_extra_blocks_first():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="at least as many blocks"):
        stage_layers(2, 3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pipeline_stages_chained_compute_exactly_the_model(arch):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=97, n_layers=3, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_hidden=64,
                     max_seq_len=16, arch=arch, tie_embeddings=arch == "gpt2", qk_norm=arch == "llama",
                     logit_softcap=30.0 if arch == "llama" else None)  # fmt: skip
    model = Transformer(args).eval()
    ids = torch.randint(0, 97, (3, 16))
    ranges = stage_layers(3, 2)
    stages = [StageModule(model, r, first=i == 0, last=i == 1) for i, r in enumerate(ranges)]
    with torch.no_grad():
        assert torch.equal(stages[1](stages[0](ids)), model(ids))
    # Stages keep the model's parameter names, which is what lets checkpoints move between layouts.
    names = {n for s in stages for n, _ in s.named_parameters()}
    assert names == {n for n, _ in model.named_parameters(remove_duplicate=False)}


def test_parallelize_applies_activation_checkpointing_then_the_layout_then_compile():
    from lmforge.train.distributed import parallelize

    args = ModelArgs(vocab_size=97, n_layers=3, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_hidden=64,
                     max_seq_len=16)  # fmt: skip
    model = Transformer(args)
    world = World(device=torch.device("cpu"))
    par = parallelize(model, world, ParallelConfig(), TrainConfig(activation_checkpointing=2, compile=True))
    # The loss is given the compiled model; optimizer, checkpoints and evaluation use the plain one, whose every
    # second block recomputes its activations.
    assert par.compiled and par.module._orig_mod is model and par.state_module is par.eval_module is model
    assert [getattr(b, "_lmforge_activation_checkpointing", False) for b in model.model.layers] == [True, False, True]
    plain = parallelize(Transformer(args), world, ParallelConfig(), TrainConfig(compile=False))
    assert not plain.compiled and plain.module is plain.state_module


def test_pipeline_refuses_tied_embeddings():
    args = ModelArgs(vocab_size=97, n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_hidden=64,
                     max_seq_len=16, tie_embeddings=True)  # fmt: skip
    world = World(device=torch.device("cpu"), world_size=2, pp_size=2)
    with pytest.raises(ValueError, match="tie_embeddings=false"):
        build_pipeline(Transformer(args), world, ParallelConfig(pipeline=2), TrainConfig(), lambda b: b)


def test_settings_that_cannot_run_are_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        init_world(ParallelConfig(pipeline=2))
    world = World(device=torch.device("cpu"), world_size=3, dp_size=3)
    with pytest.raises(ValueError, match="train.batch_size=16 .* multiple of 3"):
        check_batch(TrainConfig(batch_size=16), world)
    assert check_batch(TrainConfig(batch_size=12), world) == 4


def test_a_whole_recipe_runs_under_torchrun_and_skips_what_is_done(tmp_path):
    overrides = [f"data.source={stdlib_root() / 'json'}", "data.val_fraction=0.3", "data.near_dedup=false",
                 "data.pii=false", "tokenizer.vocab_size=400", f"run_dir={tmp_path}", "name=r",
                 "stages=[curate, tokenizer, shards, pretrain]", *COMMON, "train.max_steps=6", "train.ckpt_every=3",
                 "parallel.data=fsdp"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge.cli",
           "run", *overrides]  # fmt: skip
    first = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=_env())
    assert first.returncode == 0, first.stdout[-4000:]
    manifest = json.loads((tmp_path / "r" / "pretrain" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["parallel"] == {"data": "fsdp", "dp": 2, "pipeline": 1}
    again = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=_env())
    assert again.returncode == 0, again.stdout[-4000:]
    assert again.stdout.count("skipped: up to date") == 4


def test_embed_refuses_torchrun_with_the_reason(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["embed", str(tmp_path), "--pairs", "stdlib"])
    assert result.exit_code == 2 and "runs in one process; launch it without torchrun" in result.output


ALPACA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "instruct" / "alpaca_data_first200.json"
SFT_STEPS = 10


def sft(base: Path, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """`lmforge sft` on 60 Alpaca records (under torchrun when nproc > 1)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "lmforge.cli", "sft", str(base), "--data", str(ALPACA), "--limit", "60", "-o", str(out),
           *extra, "train.seq_len=64", "train.batch_size=8", f"train.max_steps={SFT_STEPS}", "train.warmup_steps=2",
           "train.eval_every=5", "train.ckpt_every=5", "train.compile=false"]  # fmt: skip
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                            env=_env())  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    return result


@pytest.mark.skipif(not ALPACA.exists(), reason=f"shared test data not found: {ALPACA}")
@pytest.mark.parametrize("method", [[], ["--method", "lora"], ["--method", "prefix", "--prefix-length", "4"]],
                         ids=["full", "lora", "prefix"])  # fmt: skip
def test_fine_tuning_on_two_ranks_follows_one_process(single, tmp_path, method):
    base = single("adamw") / "final"
    one, two = tmp_path / "one", tmp_path / "two"
    sft(base, one, 1, *method)
    sft(base, two, 2, *method)
    ra, rb = records(one), records(two)
    assert [r["step"] for r in rb] == list(range(1, SFT_STEPS + 1))
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < TOL, (x["step"], x["loss"], y["loss"])
        assert abs(x.get("val_loss", 0.0) - y.get("val_loss", 0.0)) < TOL
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    if "prefix" in method:
        pa, pb = (load_file(str(d / "prefix" / "prefix.safetensors"))["prefix"] for d in (one, two))
        assert float((pa - pb).abs().max()) < 1e-4


@pytest.mark.skipif(not ALPACA.exists(), reason=f"shared test data not found: {ALPACA}")
def test_fine_tuning_refuses_sharded_layouts(single, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge.cli",
           "sft", str(single("adamw") / "final"), "--data", str(ALPACA), "--limit", "20", "-o", str(tmp_path / "x"),
           "train.seq_len=64", "train.batch_size=8", "train.max_steps=2", "parallel.data=fsdp"]  # fmt: skip
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                            env=_env())  # fmt: skip
    assert result.returncode != 0
    assert "fine-tuning runs data parallel with parallel.data=ddp only" in result.stdout
