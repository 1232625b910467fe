"""The pretrain stage with every objective, mixtures, packing with document masking, Muon and the gpt2 preset."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import json_package_run
from lmforge.pretrain import pretrain
from lmforge.model.config import ModelConfig
from lmforge.objectives import PretrainConfig
from lmforge.train.config import TrainConfig

TINY_MODEL = dict(depth=1, d_model=64, max_seq_len=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return json_package_run(tmp_path_factory.mktemp("objectives"))


def _train(data, out, objective="clm", steps=8, model=None, **kw):
    train_cfg = TrainConfig(seq_len=64, batch_size=4, max_steps=steps, warmup_steps=1, eval_every=steps,
                            eval_batches=1, ckpt_every=kw.pop("ckpt_every", steps), threads=1,
                            **{k: v for k, v in kw.items() if k in TrainConfig.model_fields})  # fmt: skip
    pre = PretrainConfig(objective=objective, **{k: v for k, v in kw.items() if k in PretrainConfig.model_fields})
    return pretrain(data / "shards", data / "tokenizer" / "tokenizer.json", ModelConfig(**(model or TINY_MODEL)),
                    train_cfg, out, pre)  # fmt: skip


@pytest.mark.parametrize("objective", ["clm", "mlm", "span", "prefix_lm", "contrastive"])
def test_every_objective_trains_and_reports_its_validation_loss(data, tmp_path, objective):
    m = _train(data, tmp_path, objective, steps=12)
    assert m["val_objective"] == objective
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-4:]) < losses[0]  # it learns something in 12 steps
    if objective == "mlm":
        assert 0.0 <= m["val_mlm_accuracy"] <= 1.0


def test_a_mixture_draws_objectives_by_weight_and_resumes_to_the_same_weights(data, tmp_path):
    mix = {"clm": 1.0, "mlm": 1.0, "span": 1.0}
    clean = _train(data, tmp_path / "clean", mix, steps=10, ckpt_every=5)
    # Each step's record says which objective it drew (one micro-batch, one rank: shares of 0 or 1).
    records = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    shares = [{k: r[f"{k}_share"] for k in mix} for r in records]
    assert all(sorted(s.values()) == [0.0, 0.0, 1.0] for s in shares)
    assert len({max(s, key=s.get) for s in shares}) >= 2
    assert clean["final_metrics"] == {f"{k}_share": shares[-1][k] for k in sorted(mix)}
    _train(data, tmp_path / "killed", mix, steps=10, ckpt_every=5)
    # Pretend the second run died after its step-5 checkpoint: drop what came later and run again.
    shutil.rmtree(tmp_path / "killed" / "final")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step_000010")
    m = _train(data, tmp_path / "killed", mix, steps=10, ckpt_every=5)
    assert m["resumed_from"] == 5 and m["val_objective"] == "clm"
    a = load_file(tmp_path / "clean" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_packing_with_document_masking_and_muon_on_the_modern_model(data, tmp_path):
    modern = dict(TINY_MODEL, mlp="relu2", qk_norm=True, logit_softcap=15.0, zero_init_out=True)
    m = _train(data, tmp_path, "clm", steps=10, model=modern, packing="best_fit", document_masking=True,
               optimizer="muon")  # fmt: skip
    assert m["final_val_loss"] < 6.0 and m["steps"] == 10


def test_gpt2_preset_trains(data, tmp_path):
    m = _train(data, tmp_path, "clm", steps=10, model=dict(TINY_MODEL, arch="gpt2"))
    assert m["final_val_loss"] < 6.0


def test_packing_refuses_objectives_it_cannot_feed(data, tmp_path):
    with pytest.raises(ValueError, match="packing=best_fit packs documents for causal LM"):
        _train(data, tmp_path, "mlm", packing="best_fit")
    with pytest.raises(ValueError, match="document_masking needs pretrain.packing=best_fit"):
        _train(data, tmp_path, "clm", document_masking=True)
