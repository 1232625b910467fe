import math

import pytest
import torch

from lmforge.model.transformer import ModelArgs, RMSNorm, Transformer
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer, lr_at


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    return TrainConfig(**(base | kw))


def test_warmup_is_linear_from_lr_over_warmup():
    c = cfg()
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(4, c) == pytest.approx(0.5)
    assert lr_at(9, c) == pytest.approx(1.0)


def test_cosine_decay_values():
    c = cfg(schedule="cosine")
    assert lr_at(10, c) == pytest.approx(1.0)
    # A quarter of the way through decay: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2.
    assert lr_at(35, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, c) == pytest.approx(0.55)
    assert lr_at(110, c) == pytest.approx(0.1)
    assert lr_at(500, c) == pytest.approx(0.1)


def test_linear_decay_values():
    c = cfg(schedule="linear")
    assert lr_at(35, c) == pytest.approx(0.775)
    assert lr_at(85, c) == pytest.approx(0.325)
    assert lr_at(110, c) == pytest.approx(0.1)


def test_constant_after_warmup_and_no_warmup():
    assert lr_at(50, cfg(schedule="constant")) == 1.0
    assert lr_at(0, cfg(warmup_steps=0)) == 1.0
    assert lr_at(0, cfg(warmup_steps=0, max_steps=10, min_lr_ratio=0.0, schedule="linear")) == 1.0
    assert lr_at(5, cfg(warmup_steps=0, max_steps=10, min_lr_ratio=0.0, schedule="linear")) == pytest.approx(0.5)


def test_lr_is_pure():
    c = cfg()
    assert [lr_at(s, c) for s in range(0, 120, 7)] == [lr_at(s, c) for s in range(0, 120, 7)]
    with pytest.raises(ValueError):
        lr_at(-1, c)


def test_norms_are_not_decayed_matrices_and_embeddings_are():
    model = Transformer(ModelArgs.from_config(ModelConfig(depth=2, d_model=32, max_seq_len=16), 64))
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    assert {id(p) for p in no_decay["params"]} == norms
    assert len(norms) == 5  # two per block and the final norm
    decayed = {id(p) for p in decay["params"]}
    assert id(model.model.embed_tokens.weight) in decayed
    assert id(model.lm_head.weight) in decayed
    assert id(model.model.layers[0].mlp.up_proj.weight) not in decayed  # frozen: not optimised at all
    assert len(decayed) + len(norms) == sum(1 for p in model.parameters() if p.requires_grad)


def test_betas_and_fused_kernel_on_cpu():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, TrainConfig(beta1=0.8, beta2=0.99, lr=0.5, warmup_steps=0))
    assert opt.defaults["fused"] is True
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert opt.param_groups[0]["lr"] == 0.5
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]  # weight decayed, bias not
