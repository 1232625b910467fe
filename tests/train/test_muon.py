"""Muon: Newton-Schulz orthogonalisation, the Muon/AdamW split, lr_scale, checkpoint round trip and training."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.data.loader import BatchLoader
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import clm_loss
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig
from lmforge.train.checkpoint import TrainerState, load_latest_training_checkpoint, save_training_checkpoint
from lmforge.train.loop import train
from lmforge.train.muon import NS_BAND, NS_FLOOR, Muon, newton_schulz, update_scale
from lmforge.train.optim import CombinedOptimizer, build_optimizer, muon_partition

from helpers import ByteSplit

SEQ = 32
LO, HI = NS_BAND


def tiny_model(seed: int = 0, depth: int = 2, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.from_config(ModelConfig(depth=depth, d_model=32, max_seq_len=SEQ, **kw), 256))


def muon_cfg(**kw) -> TrainConfig:
    base = dict(optimizer="muon", seq_len=SEQ, batch_size=8, max_steps=20, lr=1e-2, warmup_steps=2,
                eval_every=1000, ckpt_every=1000, threads=1, seed=0)  # fmt: skip
    return TrainConfig(**(base | kw))


def text_batch(n: int = 8, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(ByteSplit().tokens[offset:offset + n * (SEQ + 1)].copy()).view(n, SEQ + 1)
    return tokens[:, :-1], tokens[:, 1:]


def is_hidden(name: str, p: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and p.dim() == 2


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# --- Newton-Schulz ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48), (256, 32), (4, 32, 96)])
def test_newton_schulz_of_random_matrix_is_nearly_orthogonal(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = newton_schulz(g, steps=5)
    assert out.shape == g.shape and out.dtype == torch.float32
    s_in, s_out = torch.linalg.svdvals(g), torch.linalg.svdvals(out)
    # The guarantee: every singular value at or above NS_FLOOR of the Frobenius norm lands in NS_BAND, about
    # [0.68, 1.21] (the quintic iteration trades convergence to exactly 1 for speed), and none exceeds it.
    k = (s_in >= NS_FLOOR * torch.linalg.matrix_norm(g, keepdim=True).squeeze(-1)).sum(-1)
    assert s_out.max() <= HI
    for row_in, row_out, kk in zip(s_in.reshape(-1, s_in.size(-1)), s_out.reshape(-1, s_out.size(-1)), k.reshape(-1)):
        assert row_out[:kk].min() >= LO, (row_out.min().item(), row_in.min().item())
    if shape[-2] != shape[-1]:
        # A rectangular Gaussian matrix is well conditioned (Marchenko-Pastur), so its whole spectrum qualifies.
        assert bool((k == min(shape[-2:])).all()) and s_out.min() >= LO
    # Near orthogonal: X X^T (the smaller Gram) is close to the identity in the mean.
    wide = out if shape[-2] <= shape[-1] else out.mT
    gram = wide @ wide.mT
    eye = torch.eye(gram.size(-1)).expand_as(gram)
    assert (gram - eye).pow(2).mean().sqrt() < 0.35


def test_newton_schulz_keeps_singular_vectors_and_maps_spectrum_into_band():
    u, v = orthogonal(32, 2), orthogonal(32, 3)
    s = torch.logspace(0, -2, 32, dtype=torch.float64)  # condition number 100
    assert s.min() / s.norm() >= NS_FLOOR
    g = (u * s) @ v.T
    out = newton_schulz(g.float()).double()
    inner = u.T @ out @ v  # diagonal if the singular vectors are unchanged
    diag = torch.diagonal(inner)
    assert (inner - torch.diag(diag)).abs().max() < 1e-4
    assert diag.min() >= LO and diag.max() <= HI
    # Below the floor the iteration cannot lift a direction all the way: tiny gradient directions stay small.
    s_low = torch.cat([torch.ones(31, dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64)])
    out_low = newton_schulz(((u * s_low) @ v.T).float()).double()
    assert torch.linalg.svdvals(out_low).min() < 0.01


def test_newton_schulz_handles_tall_matrices_by_transposing():
    g = torch.randn(96, 24, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(newton_schulz(g), newton_schulz(g.T).T, atol=1e-5)
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(5))


def test_update_scale_equalises_entry_rms_to_one_over_sqrt_fan_in():
    for rows, cols in [(32, 32), (128, 32), (32, 128), (256, 64)]:
        g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        exact = (u @ vh * update_scale(g.shape)).pow(2).mean().sqrt().item()
        assert exact == pytest.approx(1 / math.sqrt(cols), rel=1e-5), (rows, cols)
        rms = (newton_schulz(g) * update_scale(g.shape)).pow(2).mean().sqrt().item()
        assert LO <= rms * math.sqrt(cols) <= HI, (rows, cols)


# --- Muon steps -------------------------------------------------------------------------------------------------


def test_muon_updates_are_orthogonal_on_2d_weights():
    """One step from zero momentum: every Muon weight moves by lr * scale * (a matrix with singular values ~1)."""
    model = tiny_model()
    cfg = muon_cfg(lr=1e-3, muon_lr=0.02, warmup_steps=0, weight_decay=0.0)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clm_loss(model, text_batch())[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    checked = 0
    for name, p in model.named_parameters():
        if not is_hidden(name, p):
            continue
        delta = (before[name] - p.detach()) / (cfg.muon_lr * update_scale(p.shape))
        s_upd = torch.linalg.svdvals(delta)
        s_grad = torch.linalg.svdvals(grads[name])
        # Gradient directions above the floor all come out with near-equal singular values. At init some
        # attention gradients are nearly rank-deficient (condition numbers up to 1e5); their tiny directions
        # are rightly not amplified, but even there the update is far better conditioned than the gradient.
        k = int((s_grad >= NS_FLOOR * s_grad.norm()).sum())
        assert k >= 1
        assert s_upd[:k].min() >= LO and s_upd.max() <= HI, name
        assert s_upd[0] / s_upd[k - 1] <= HI / LO
        if "mlp" in name:  # well-conditioned gradients: the whole spectrum is in the band
            assert k == min(p.shape) and s_upd.min() >= LO, name
        checked += 1
    assert checked == 14

    # With a full-rank gradient every singular value of the update is in the band.
    w = nn.Parameter(torch.zeros(48, 16))
    muon = Muon([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(5))
    muon.step()
    s = torch.linalg.svdvals(-w.detach() / (0.1 * update_scale(w.shape)))
    assert s.min() >= LO and s.max() <= HI


def test_muon_step_matches_its_definition():
    """Nesterov momentum, decoupled weight decay and lr * lr_scale, checked against the formulas over two steps."""
    torch.manual_seed(6)
    w = nn.Parameter(torch.randn(20, 12))
    ref = w.detach().clone()
    opt = Muon([w], lr=0.5, lr_scale=0.1, momentum=0.9, weight_decay=0.2, ns_steps=3)
    buf = torch.zeros_like(ref)
    for step in range(2):
        g = torch.randn(20, 12)
        w.grad = g.clone()
        opt.param_groups[0]["lr"] = 0.5 / (step + 1)  # what the loop does
        opt.step()
        lr = 0.5 / (step + 1) * 0.1
        buf = 0.9 * buf + g
        ref = ref * (1 - lr * 0.2) - lr * update_scale(ref.shape) * newton_schulz(g + 0.9 * buf, steps=3)
        assert torch.allclose(w.detach(), ref, atol=1e-6)
    assert torch.allclose(opt.state[w]["momentum_buffer"], buf)


def test_muon_rejects_non_matrices_and_bad_settings():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError):
        Muon([nn.Parameter(torch.zeros(4, 4))], momentum=1.0)
    with pytest.raises(ValueError):
        Muon([nn.Parameter(torch.zeros(4, 4))], ns_steps=0)


# --- the combined optimizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_partition_of_the_transformer(tie):
    model = tiny_model(tie_embeddings=tie, qk_norm=True)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    hidden, rest = muon_partition(model)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    expect_hidden = {n for n in trainable if is_hidden(n, named[n])}
    assert {id(p) for p in hidden} == {id(named[n]) for n in expect_hidden}
    assert {id(p) for p in rest} == {id(named[n]) for n in trainable - expect_hidden}
    # Spelled out for the Llama layout: q/k/v/o and gate/up/down of every block, minus the frozen one.
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    spelled = {f"model.layers.{i}.{proj}.weight" for i in range(2) for proj in projections}
    assert expect_hidden == spelled - {"model.layers.0.mlp.up_proj.weight"}
    assert len(expect_hidden) == 2 * 7 - 1
    rest_names = trainable - expect_hidden
    assert "model.embed_tokens.weight" in rest_names and ("lm_head.weight" in rest_names) == (not tie)
    assert all(named[n].dim() == 1 for n in rest_names - {"model.embed_tokens.weight", "lm_head.weight"})

    opt = build_optimizer(model, muon_cfg(weight_decay=0.1))
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(named[n]) for n in rest_names if named[n].dim() == 2}


def test_partition_sends_biases_and_position_embeddings_to_adamw():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)  # weight to Muon, bias to AdamW
            self.ln = nn.LayerNorm(8)

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 8)
            self.embed_positions = nn.Embedding(4, 8)
            self.layers = nn.ModuleList([Block()])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()
            self.lm_head = nn.Linear(8, 10)

    model = Model()
    hidden, rest = muon_partition(model)
    assert [id(p) for p in hidden] == [id(model.model.layers[0].fc.weight)]
    block = model.model.layers[0]
    assert {id(p) for p in rest} == {id(p) for p in [
        model.model.embed_tokens.weight, model.model.embed_positions.weight, block.fc.bias, block.ln.weight,
        block.ln.bias, model.lm_head.weight, model.lm_head.bias]}  # fmt: skip


def test_non_matrix_params_get_exactly_plain_adamw():
    """The AdamW half of the combined optimizer updates its parameters bit for bit as the adamw optimizer does."""
    a, b = tiny_model(), tiny_model()
    opt_a = build_optimizer(a, muon_cfg(warmup_steps=0))
    opt_b = build_optimizer(b, muon_cfg(warmup_steps=0, optimizer="adamw"))
    for step in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            clm_loss(model, text_batch(offset=step * 300))[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        # Once the hidden weights differ, so do the gradients; compare only after the first step.
        if step == 0:
            for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
                assert torch.equal(pa, pb) != is_hidden(name, pa), name
    muon, adamw = opt_a.optimizers
    for name, p in a.named_parameters():
        if is_hidden(name, p):
            assert set(muon.state[p]) == {"momentum_buffer"} and p not in adamw.state
        else:
            assert {"exp_avg", "exp_avg_sq", "step"} <= set(adamw.state[p]) and p not in muon.state


def test_loop_lr_writes_reach_both_halves_through_lr_scale():
    model = tiny_model()
    cfg = muon_cfg(lr=2e-3, muon_lr=0.03)
    opt = build_optimizer(model, cfg)
    muon, adamw = opt.optimizers
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(15.0)
    assert all("lr_scale" not in g for g in adamw.param_groups)
    for group in opt.param_groups:
        group["lr"] = 1e-3
    assert [g["lr"] for g in muon.param_groups + adamw.param_groups] == [1e-3] * 3
    # Muon moves a weight (zero momentum, no decay) by lr * lr_scale * scale * NS(direction).
    muon.param_groups[0]["weight_decay"] = 0.0
    p = model.model.layers[0].mlp.down_proj.weight
    before = p.detach().clone()
    clm_loss(model, text_batch())[0].backward()
    expected = before - 1e-3 * 15.0 * update_scale(p.shape) * newton_schulz(p.grad * 1.95)
    opt.step()
    assert torch.allclose(p.detach(), expected, atol=1e-7)


def test_combined_state_dict_round_trips_through_checkpoint_and_resumes_bit_identically(tmp_path):
    cfg = muon_cfg()
    loader = BatchLoader(ByteSplit(), SEQ, 4, 0)

    def steps(model, opt, n):
        for _ in range(n):
            clm_loss(model, next(loader))[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model = tiny_model()
    opt = build_optimizer(model, cfg)
    steps(model, opt, 3)
    save_training_checkpoint(tmp_path, TrainerState(step=3), model, opt, loader, keep_last=1)
    meta = json.loads((tmp_path / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert meta["optimizer"]["param_groups"][0]["lr_scale"] == cfg.muon_lr / cfg.lr

    resumed_model = tiny_model(seed=9)
    resumed_opt = build_optimizer(resumed_model, cfg)
    resumed_loader = BatchLoader(ByteSplit(), SEQ, 4, 0)
    assert load_latest_training_checkpoint(tmp_path, resumed_model, resumed_opt, resumed_loader).step == 3
    sd, rsd = opt.state_dict(), resumed_opt.state_dict()
    assert rsd["param_groups"] == sd["param_groups"]
    assert sd["state"].keys() == rsd["state"].keys()
    for idx, s in sd["state"].items():
        assert s.keys() == rsd["state"][idx].keys()
        for key, value in s.items():
            other = rsd["state"][idx][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other

    steps(model, opt, 4)
    loader = resumed_loader
    steps(resumed_model, resumed_opt, 4)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


def test_adamw_checkpoint_does_not_load_into_muon(tmp_path):
    loader = BatchLoader(ByteSplit(), SEQ, 4, 0)
    model = tiny_model()
    opt = build_optimizer(model, muon_cfg(optimizer="adamw"))
    clm_loss(model, next(loader))[0].backward()
    opt.step()
    save_training_checkpoint(tmp_path, TrainerState(step=1), model, opt, loader, keep_last=1)
    with pytest.raises(ValueError, match="param groups"):
        load_latest_training_checkpoint(tmp_path, tiny_model(), build_optimizer(tiny_model(), muon_cfg()), loader)


def test_works_with_grad_scaler():
    model = tiny_model()
    opt = build_optimizer(model, muon_cfg(warmup_steps=0))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(clm_loss(model, text_batch())[0]).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # An overflow skips the step for both halves.
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(clm_loss(model, text_batch())[0]).backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 512.0


# --- the training loop ------------------------------------------------------------------------------------------


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(out: Path, cfg: TrainConfig, model: Transformer, loss_fn=clm_loss) -> dict:
    return train(model, loss_fn, BatchLoader(ByteSplit(), cfg.seq_len, cfg.batch_size, cfg.seed), cfg, out)


def test_muon_training_reduces_loss_on_real_text(tmp_path):
    metrics = run(tmp_path, muon_cfg(max_steps=30, lr=1e-2, muon_lr=0.02, warmup_steps=3), tiny_model())
    losses = [r["loss"] for r in records(tmp_path)]
    assert metrics["steps"] == 30 and metrics["skipped_steps"] == 0
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)
    assert np.mean(losses[-5:]) < losses[0] - 1.5, losses


def test_muon_run_crashed_and_resumed_in_process_is_bit_identical(tmp_path):
    class Crash(Exception):
        pass

    calls = {"n": 0}

    def crashing(model, batch, ctx=None):
        calls["n"] += 1
        if calls["n"] == 13:
            raise Crash
        return clm_loss(model, batch, ctx)

    cfg = muon_cfg(max_steps=16, batch_size=4, ckpt_every=8, keep_last=1)
    reference = tiny_model()
    run(tmp_path / "ref", cfg, reference)
    with pytest.raises(Crash):
        run(tmp_path / "run", cfg, tiny_model(), crashing)
    resumed = tiny_model(seed=99)  # the checkpoint replaces these weights
    metrics = run(tmp_path / "run", cfg, resumed)
    assert metrics["resumed_from"] == 8
    for name, p in reference.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    assert [r["loss"] for r in records(tmp_path / "run")] == [r["loss"] for r in records(tmp_path / "ref")]
