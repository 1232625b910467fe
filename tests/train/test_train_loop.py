import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.data.loader import BatchLoader
from lmforge.model.io import load_model, write_model_files
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import clm_loss
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig
from lmforge.train.checkpoint import TrainerState, load_latest_training_checkpoint
from lmforge.train.loop import TrainingDiverged, train
from lmforge.train.optim import build_optimizer, lr_at

from helpers import ByteSplit

SEQ = 32
ARGS = ModelArgs.from_config(ModelConfig(depth=1, d_model=32, max_seq_len=SEQ), 256)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ARGS)


def config(**kw) -> TrainConfig:
    base = dict(seq_len=SEQ, batch_size=8, max_steps=20, lr=1e-2, warmup_steps=2, eval_every=1000,
                ckpt_every=1000, threads=1, seed=0)  # fmt: skip
    return TrainConfig(**(base | kw))


def run(out: Path, cfg: TrainConfig, loss_fn=clm_loss, model: Transformer | None = None, **kw) -> dict:
    loader = BatchLoader(ByteSplit(), cfg.seq_len, cfg.batch_size, cfg.seed)
    return train(model or tiny_model(), loss_fn, loader, cfg, out, **kw)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class FaultyLoss:
    """clm_loss, except that the listed calls (1-based) return the loss times the given factor."""

    def __init__(self, factors: dict[int, float]) -> None:
        self.factors, self.calls = factors, 0

    def __call__(self, model, batch, ctx=None):
        self.calls += 1
        loss, metrics = clm_loss(model, batch, ctx)
        return loss * self.factors.get(self.calls, 1.0), metrics


def test_loss_decreases_on_real_text(tmp_path):
    metrics = run(tmp_path, config(max_steps=40))
    recs = records(tmp_path)
    assert metrics["steps"] == 40 and metrics["tokens"] == 40 * 8 * SEQ
    assert recs[0]["loss"] == pytest.approx(np.log(256), abs=0.3)  # near-uniform at init
    assert np.mean([r["loss"] for r in recs[-5:]]) < recs[0]["loss"] - 1.5
    assert metrics["final_loss"] == recs[-1]["loss"]
    assert metrics["skipped_steps"] == 0 and metrics["resumed_from"] is None
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_metrics_jsonl_records(tmp_path):
    cfg = config(max_steps=6, eval_every=4, batch_size=4)
    calls = []
    metrics = run(tmp_path, cfg, val_fn=lambda m: calls.append(m.training) or 2.5,
                  flops_per_token=tiny_model().flops_per_token(SEQ))  # fmt: skip
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    base = {"step", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "tokens_per_s", "mfu"}
    assert [set(r) for r in recs] == [base, base, base, base | {"val_loss"}, base, base | {"val_loss"}]
    assert [r["tokens"] for r in recs] == [4 * SEQ * s for s in range(1, 7)]
    assert all(r["loss_tokens"] == 4 * SEQ for r in recs)  # every target of the step counts: none is ignored
    assert metrics["final_metrics"] == {} and metrics["final_eval_metrics"] == {}  # clm_loss reports none
    assert [r["lr"] for r in recs] == [lr_at(s, cfg) for s in range(6)]
    assert recs[3]["val_loss"] == 2.5 and calls == [False, False]  # val_fn sees the model in eval mode
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in recs)
    assert metrics["final_val_loss"] == 2.5
    assert metrics["peak_flops"] > 1e9 and 0 < metrics["mfu"] < 1 and metrics["tokens_per_s"] > 0
    assert metrics["train_seconds"] > 0


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    # The same 8 windows either as one batch or as two micro-batches of 4 (the loader order is shared).
    big, small = tiny_model(), tiny_model()
    run(tmp_path / "big", config(max_steps=3, batch_size=8, grad_accum=1), model=big)
    run(tmp_path / "small", config(max_steps=3, batch_size=4, grad_accum=2), model=small)
    start = tiny_model().state_dict()
    for name, p in big.state_dict().items():
        assert not torch.equal(p, start[name]) or name.endswith("norm.weight")
        assert torch.allclose(p, small.state_dict()[name], rtol=0, atol=1e-6), name
    assert records(tmp_path / "big")[-1]["tokens"] == records(tmp_path / "small")[-1]["tokens"] == 3 * 8 * SEQ


def test_nan_and_spike_steps_are_skipped_and_counted(tmp_path):
    nan = float("nan")
    loss_fn = FaultyLoss({5: nan, 6: nan, 15: 100.0})
    metrics = run(tmp_path, config(max_steps=20, max_bad_steps=3), loss_fn=loss_fn)
    assert metrics["skipped_steps"] == 3 and metrics["steps"] == 20
    recs = records(tmp_path)
    assert len(recs) == 20
    skipped = {r["step"]: r["skipped"] for r in recs if "skipped" in r}
    assert set(skipped) == {5, 6, 15}
    assert skipped[5] == "non-finite loss nan" and recs[4]["loss"] is None and recs[4]["grad_norm"] is None
    assert skipped[15].startswith(f"loss {recs[14]['loss']:.4g} > 10 x running mean")
    assert all(r["loss"] is not None for r in recs if r["step"] not in (5, 6))


def test_skipped_step_leaves_weights_untouched(tmp_path):
    skipped, reference = tiny_model(), tiny_model()
    run(tmp_path / "a", config(max_steps=2), loss_fn=FaultyLoss({2: float("inf")}), model=skipped)
    run(tmp_path / "b", config(max_steps=1), model=reference)  # warmup: step 1 has the same lr in both
    for name, p in skipped.state_dict().items():
        assert torch.equal(p, reference.state_dict()[name]), name


def test_consecutive_bad_steps_raise_and_keep_the_last_good_checkpoint(tmp_path):
    nan = float("nan")
    cfg = config(max_steps=30, ckpt_every=5, keep_last=2, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 15: 3 bad steps in a row .*losses \[nan, nan, nan\]"):
        run(tmp_path, cfg, loss_fn=FaultyLoss({13: nan, 14: nan, 15: nan}))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["LATEST", "step_000005", "step_000010"]
    assert (ckpts / "LATEST").read_text() == "step_000010\n"
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 16))
    # The intact checkpoint resumes: a healthy rerun continues from step 10 to the end.
    metrics = run(tmp_path, cfg)
    assert metrics["resumed_from"] == 10 and metrics["steps"] == 30 and metrics["skipped_steps"] == 0
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 31))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run(tmp_path, config(max_steps=10, ckpt_every=2, keep_last=2))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["LATEST", "step_000008", "step_000010"]
    assert (ckpts / "LATEST").read_text() == "step_000010\n"
    assert sorted(p.name for p in (ckpts / "step_000010").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]  # fmt: skip
    state = json.loads((ckpts / "step_000010" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 10 and state["loader"] == {"epoch": 0, "position": 10}
    assert set(load_file(ckpts / "step_000010" / "rng.safetensors")) == {"torch_cpu"}


def test_leftover_tmp_checkpoint_is_ignored_and_removed(tmp_path):
    run(tmp_path, config(max_steps=10, ckpt_every=5))
    partial = tmp_path / "checkpoints" / "step_000015.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    model = tiny_model()
    opt = build_optimizer(model, config())
    loader = BatchLoader(ByteSplit(), SEQ, 8, 0)
    state = load_latest_training_checkpoint(tmp_path, model, opt, loader)
    assert isinstance(state, TrainerState) and state.step == 10
    assert not partial.exists()
    assert loader.state_dict() == {"epoch": 0, "position": 10}
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(p, final[n]) for n, p in model.state_dict().items() if n in final)
    assert opt.state_dict()["state"][0]["step"].item() == 10.0


def test_model_files_writer_is_used_for_checkpoints_and_final(tmp_path):
    cfg = config(max_steps=4, ckpt_every=2)
    model = tiny_model()
    run(tmp_path, cfg, model=model, write_model_files=lambda m, d: write_model_files(m, ARGS, d, None))
    assert (tmp_path / "checkpoints" / "step_000004" / "model.json").is_file()
    loaded, args = load_model(tmp_path / "final")
    assert args == ARGS
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    assert not list(tmp_path.glob("final.*"))


def test_device_precision_and_mfu_helpers(caplog):
    from lmforge.train.flops import measure_peak_flops, mfu
    from lmforge.device import resolve_device
    from lmforge.train.precision import autocast_context, compute_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")
    cpu = torch.device("cpu")
    assert compute_dtype(cpu, "auto") == torch.float32 and compute_dtype(cpu, "bf16") == torch.bfloat16
    with autocast_context(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with caplog.at_level("WARNING"), autocast_context(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
    assert "slower" in caplog.text
    assert mfu(1000.0, 2e6, 4e9) == 0.5
    peak = measure_peak_flops(cpu, seconds=0.2)
    assert peak > 1e9 and measure_peak_flops(cpu) == peak  # cached for the process


def test_fp16_uses_a_loss_scaler_and_skips_overflows_without_calling_them_divergence(tmp_path):
    """fp16 autocast: an overflowing scale is halved and the step skipped; the run keeps learning and resumes."""
    cfg = config(precision="fp16", max_steps=16, ckpt_every=8)
    torch.manual_seed(0)
    model = tiny_model()
    loader = BatchLoader(ByteSplit(), cfg.seq_len, cfg.batch_size, cfg.seed)
    # A start scale of 2**22 overflows fp16 gradients; each overflow halves it (GradScaler's backoff).
    import lmforge.train.loop as loop_module

    original = loop_module.grad_scaler

    def huge_scaler(device, precision):
        scaler = original(device, precision)
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**22})
        return scaler

    loop_module.grad_scaler = huge_scaler
    try:
        metrics = train(model, clm_loss, loader, cfg, tmp_path)
    finally:
        loop_module.grad_scaler = original
    recs = records(tmp_path)
    overflowed = [r for r in recs if "fp16 gradient overflow" in r.get("skipped", "")]
    assert overflowed and metrics["skipped_steps"] == len(overflowed) < cfg.max_steps
    state = json.loads(next((tmp_path / "checkpoints").glob("step_000016/*.json")).read_text())
    assert "loss_scale" in json.dumps(state)
    losses = [r["loss"] for r in recs if "skipped" not in r]
    assert losses[-1] < losses[0]


def test_activation_checkpointing_trains_to_the_same_losses(tmp_path):
    plain = run(tmp_path / "plain", config(max_steps=6))
    recomputed = run(tmp_path / "ckpt", config(max_steps=6, activation_checkpointing=1))
    a = [r["loss"] for r in records(tmp_path / "plain")]
    b = [r["loss"] for r in records(tmp_path / "ckpt")]
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6) and plain["steps"] == recomputed["steps"] == 6
    same = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    other = load_file(tmp_path / "ckpt" / "final" / "model.safetensors")
    assert same.keys() == other.keys()  # wrapping blocks leaves the saved names alone
