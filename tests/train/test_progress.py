"""What a user sees while training runs: progress lines, evaluation notices, Ctrl-C, log lines in files, --help."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer.main
from safetensors.torch import load_file, save_model

import lmforge.train.loop as loop_module
import lmforge.train.step as step_module
import lmforge.train.progress as progress_module
from lmforge.cli import app
from lmforge.train.progress import Pace, TrainingInterrupted, TrainingProgress, duration

from helpers import json_package_run
from test_train_loop import FaultyLoss, config, records, run, tiny_model


@pytest.fixture(autouse=True)
def sigint_heard():
    """A shell without job control starts background jobs with SIGINT ignored, and Ctrl-C handling rightly stays
    off where SIGINT is ignored; these tests send SIGINT, so they run with Python's own handler (and so do the
    processes they start, which inherit an ignored signal but not a handler)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class FakeTime:
    """Stands in for the `time` module in the loop: the clock moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("lmforge.train")]


def test_logged_throughput_and_eta_count_training_time_only(tmp_path, monkeypatch, caplog):
    """Each step trains 256 tokens in 1 s; an evaluation takes 100 s and a checkpoint 50 s, and neither shows."""
    clock = FakeTime()
    monkeypatch.setattr(loop_module, "time", clock)
    monkeypatch.setattr(step_module, "time", clock)
    monkeypatch.setattr(progress_module, "time", clock)

    def loss_fn(model, batch, ctx=None):
        clock.now += 1.0
        return FaultyLoss({})(model, batch, ctx)

    def val_fn(model):
        clock.now += 100.0
        return 2.5

    def writer(model, directory):
        clock.now += 50.0
        save_model(model, str(directory / "model.safetensors"))

    with caplog.at_level("INFO"):
        run(tmp_path, config(max_steps=4, eval_every=2, ckpt_every=2), loss_fn=loss_fn, val_fn=val_fn,
            write_model_files=writer, val_batches=3)  # fmt: skip
    assert [r["tokens_per_s"] for r in records(tmp_path)] == [256.0] * 4
    lines = [re.sub(r"^(step \d/4: )loss \S+(.*)  lr \S+", r"\1loss L\2  lr R", s) for s in progress_lines(caplog)]
    assert [line for line in lines if line.startswith("step ")] == [
        "step 1/4: loss L  256 tok/s  lr R  elapsed 0:01  ETA 0:03",
        "step 2/4: loss L  256 tok/s  lr R  elapsed 0:02  ETA 0:02",
        "step 2/4: evaluating on 3 validation batches...",
        "step 2: val_loss 2.5000 (100.0 s)",
        "step 3/4: loss L  256 tok/s  lr R  elapsed 2:33  ETA 0:01",
        "step 4/4: loss L  256 tok/s  lr R  elapsed 2:34  ETA 0:00",
        "step 4/4: evaluating on 3 validation batches...",
        "step 4: val_loss 2.5000 (100.0 s)",
    ]


def test_a_log_file_hears_from_training_at_least_every_ten_seconds(monkeypatch, caplog):
    """Lines every max_steps // 20 steps, and one after 10 s without, so a slow run is never silent for long."""
    clock = FakeTime()
    monkeypatch.setattr(progress_module, "time", clock)
    progress = TrainingProgress(100, 0, clock.now, bar=False)  # regular lines every 5 steps
    logged = []
    with caplog.at_level("INFO", logger="lmforge.train.progress"), progress:
        for step, seconds in enumerate([1.0] * 6 + [4.0] * 4, start=1):
            clock.now += seconds
            n = len(caplog.records)
            progress.step_done(step, seconds, 256, 2.0, 1e-3)
            logged += [step] * (len(caplog.records) - n)
    assert logged == [5, 9, 10]  # 5 and 10 (regular); 9: 13 s after step 5 (step 8 was 9 s after it)


def test_pace_leaves_out_the_first_step_once_a_later_one_is_known():
    pace = Pace(window=3)
    pace.add(50.0, 100)  # compilation
    assert pace.tokens_per_s() == 2.0 and pace.eta(10) == 500.0
    for seconds in (1.0, 2.0, 3.0, 4.0):
        pace.add(seconds, 100)
    assert pace.tokens_per_s() == 300 / 9 and pace.eta(10) == 30.0  # the last three steps only
    assert [duration(s) for s in (0.4, 59.6, 61, 3600, 3725.2)] == ["0:00", "1:00", "1:01", "1:00:00", "1:02:05"]


def test_compiled_run_says_why_its_first_step_is_slow(caplog):
    with caplog.at_level("INFO"), TrainingProgress(10, 0, 0.0, compiled=True, bar=False) as progress:
        progress.step_done(1, 49.25, 100, 5.0, 1e-3)
        progress.step_done(2, 0.5, 100, 4.0, 1e-3)
    said = progress_lines(caplog)
    assert said[0].startswith("compiling the model with torch.compile: the first step takes longer")
    assert said[1] == "step 1 took 49.2 s, compilation included"
    assert not any("compilation" in line for line in said[2:])


def interrupting(at_call: int, base=None):
    """clm_loss, except that call `at_call` sends this process a SIGINT, as Ctrl-C in a terminal does."""
    base = base or FaultyLoss({})

    def loss_fn(model, batch, ctx=None):
        if base.calls + 1 == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return base(model, batch, ctx)

    return loss_fn


def assert_same_final_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_the_finished_step_and_resumes_bit_exactly(tmp_path):
    cfg = config(max_steps=12, ckpt_every=4, seed=1)
    run(tmp_path / "ref", cfg)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"^training stopped by Ctrl-C after step 6 of 12; checkpoint saved "
                       r"in .*step_000006; training again into .* resumes from it$"):  # fmt: skip
        run(tmp_path / "run", cfg, loss_fn=interrupting(at_call=6))
    assert signal.getsignal(signal.SIGINT) is before
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["LATEST", "step_000004",
                                                                                    "step_000006"]  # fmt: skip
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 7))
    metrics = run(tmp_path / "run", cfg, model=tiny_model(seed=5))
    assert metrics["resumed_from"] == 6
    assert_same_final_weights(tmp_path / "ref", tmp_path / "run")
    assert [r["loss"] for r in records(tmp_path / "run")] == [r["loss"] for r in records(tmp_path / "ref")]


def test_second_ctrl_c_during_the_save_stops_at_once_and_leaves_the_last_checkpoint(tmp_path):
    cfg = config(max_steps=12, ckpt_every=4, seed=1)
    run(tmp_path / "ref", cfg)

    def writer(model, directory):
        if directory.name == "step_000006.tmp":  # the Ctrl-C checkpoint, half written
            save_model(model, str(directory / "model.safetensors"))
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the KeyboardInterrupt lands here
        save_model(model, str(directory / "model.safetensors"))

    with pytest.raises(KeyboardInterrupt) as raised:
        run(tmp_path / "run", cfg, loss_fn=interrupting(at_call=6), write_model_files=writer)
    assert not isinstance(raised.value, TrainingInterrupted)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["LATEST", "step_000004", "step_000006.tmp"]
    metrics = run(tmp_path / "run", cfg)
    assert metrics["resumed_from"] == 4
    assert not (tmp_path / "run" / "checkpoints" / "step_000006.tmp").exists()
    assert_same_final_weights(tmp_path / "ref", tmp_path / "run")


@pytest.fixture(scope="module")
def json_data(tmp_path_factory) -> Path:
    """Curated text, tokenizer and shards of the json package (runs/d under a module-wide folder)."""
    return json_package_run(tmp_path_factory.mktemp("json"))


def test_ctrl_c_in_lmforge_pretrain_says_how_to_resume(json_data, tmp_path):
    data = json_data
    lmforge = Path(sys.executable).with_name("lmforge")
    out = tmp_path / "pre"
    command = [str(lmforge), "pretrain", str(data / "shards"), "-t", str(data / "tokenizer" / "tokenizer.json"),
               "-o", str(out), "model.depth=1", "model.d_model=64", "model.max_seq_len=64", "train.seq_len=64",
               "train.batch_size=8", "train.max_steps=120", "train.threads=1", "train.ckpt_every=1000"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= step < 120
    saved = out / "checkpoints" / f"step_{step:06d}"
    assert saved.is_dir() and "Ctrl-C: saving a checkpoint of step" in stderr
    assert stderr.splitlines()[-2:] == [
        f"training stopped by Ctrl-C after step {step} of 120; checkpoint saved in {saved}; training again into "
        f"{out} resumes from it",
        f"to resume, run the same command again: {' '.join(command)}",
    ]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {saved} (step {step})" in again.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 121))


def test_pipeline_eval_and_sft_announce_their_long_phases(json_data, tmp_path, caplog):
    from lmforge.eval.run import evaluate_checkpoint
    from lmforge.finetune.data import Message
    from lmforge.finetune.sft import finetune_conversations
    from lmforge.finetune.stage import generation_check
    from lmforge.model.io import load_checkpoint_tokenizer, load_model
    from lmforge.pretrain import pretrain
    from lmforge.eval.config import EvalConfig
    from lmforge.model.config import ModelConfig
    from lmforge.train.config import TrainConfig

    def said(logger: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger]

    with caplog.at_level("INFO"):
        json_package_run(json_data.parent)  # every stage up to date: each is still named as the run reaches it
    assert said("lmforge.pipeline") == ["stage 1/3: curate", "stage 2/3: tokenizer", "stage 3/3: shards"]

    tiny = dict(seq_len=32, batch_size=2, max_steps=1, threads=1)
    pretrain(json_data / "shards", json_data / "tokenizer" / "tokenizer.json", ModelConfig(depth=1, d_model=32,
             max_seq_len=64), TrainConfig(**tiny), tmp_path / "pre")  # fmt: skip
    checkpoint, val = tmp_path / "pre" / "final", json_data / "curate" / "val"
    caplog.clear()
    with caplog.at_level("INFO"):
        evaluate_checkpoint(checkpoint, val, EvalConfig(samples=1, sample_tokens=4, code=["stdlib"], code_limit=1,
                            code_max_new_tokens=4), tmp_path / "eval", training_data=json_data / "curate")  # fmt: skip
    eval_lines = said("lmforge.eval.run") + said("lmforge.eval.suite")
    assert eval_lines[0] == f"held-out: scoring the text in {val} (and compressing each document with xz -9e, " \
                            "the reference)..."  # fmt: skip
    assert "sample generations: 1 of up to 4 tokens..." in eval_lines
    assert "stdlib: generating 1 completion(s) per problem and running them in the sandbox..." in eval_lines
    assert "contamination: scanning the training data for the examples of stdlib..." in eval_lines

    model, _ = load_model(checkpoint)
    tok = load_checkpoint_tokenizer(checkpoint)
    conv = [Message("user", "def f():"), Message("assistant", "    return 1")]
    caplog.clear()
    with caplog.at_level("INFO"):
        generation_check(model, tok, [conv[:1]], 3, None)
        finetune_conversations(checkpoint, [conv] * 4, [conv] * 3, tmp_path / "sft", TrainConfig(**tiny))
    assert said("lmforge.finetune.stage") == ["generating greedy replies to 1 held-out prompts, up to 3 tokens each..."]
    assert [m for m in said("lmforge.finetune.sft") if m.startswith("held-out loss")] == [
        "held-out loss before fine-tuning, on 2 batches...", "held-out loss after fine-tuning, on 2 batches..."]


@pytest.mark.parametrize("raised,said", [
    (TrainingInterrupted("training stopped by Ctrl-C after step 3 of 9; checkpoint saved in X"),
     "training stopped by Ctrl-C after step 3 of 9; checkpoint saved in X"),
    (KeyboardInterrupt(), "interrupted"),  # before training, e.g. while curating
])  # fmt: skip
def test_ctrl_c_in_lmforge_run_says_how_to_resume(tmp_path, monkeypatch, raised, said):
    from typer.testing import CliRunner

    def interrupted(recipe):
        raise raised

    monkeypatch.setattr("lmforge.pipeline.run_recipe", interrupted)
    argv = ["lmforge", "run", f"run_dir={tmp_path}", "train.max_steps=9"]
    monkeypatch.setattr(sys, "argv", argv)
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-2:] == [said, f"to resume, run the same command again: {' '.join(argv)}"]


def test_log_records_written_to_a_pipe_stay_on_one_line():
    message = "step 140/560: " + "loss 4.1234  6,012 tok/s  MFU 65.0%  " * 5 + "12,345,678"
    assert len(message) > 200
    code = ("import logging; from lmforge.cli import _setup_logging; _setup_logging(False); "
            f"logging.getLogger('lmforge.x').info({message!r})")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, "COLUMNS": "80"})  # fmt: skip
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] INFO     " + re.escape(message) + "\n", out.stderr), out.stderr


def test_every_cli_option_and_argument_has_help():
    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    missing = []

    def walk(command, path: str) -> None:
        missing.extend(f"{path} {p.opts[0]}" for p in command.params if not (getattr(p, "help", None) or "").strip())
        for name in getattr(command, "list_commands", lambda ctx: [])(ctx):
            walk(command.get_command(ctx, name), f"{path} {name}")

    walk(root, "lmforge")
    assert missing == []
    assert len(root.list_commands(ctx)) > 10  # the walk reached the verbs


def test_held_out_scoring_says_it_is_still_working(monkeypatch, caplog):
    """A long held-out scoring logs a line after every 10 s without one, so the eval stage is never silent."""
    import torch

    import lmforge.eval.perplexity as perplexity

    clock = FakeTime()
    monkeypatch.setattr(progress_module, "time", clock)

    def slow_nll(model, xs, ys):
        clock.now += 4.0  # each batch of windows takes 4 s
        return torch.ones(ys.shape)

    monkeypatch.setattr(perplexity, "token_nll", slow_nll)

    class Tok:
        bos_id, doc_start_id, pad_id = 0, 0, 0

        def encode(self, text):
            return [1 + ord(c) % 50 for c in text]

    with caplog.at_level("INFO", logger="lmforge.eval.perplexity"):
        perplexity.score_texts(torch.nn.Identity(), Tok(), ["some text " * 40] * 10, seq_len=16, batch_size=4)
    beats = [r.getMessage() for r in caplog.records]
    assert len(beats) >= 3 and all(b.startswith("held-out: ") and b.endswith("scored so far...") for b in beats)
