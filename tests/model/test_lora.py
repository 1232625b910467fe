from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    base_state_dict,
    load_adapter,
    merge_lora,
    save_adapter,
    set_active,
    trainable_parameters,
    unmerge_lora,
)
from lmforge.model.transformer import ModelArgs, Transformer

ARGS = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_hidden=64, max_seq_len=32)


def make_model(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**ARGS, **over})).eval()


def ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ARGS["vocab_size"], (2, 12), generator=g)


def train_steps(model: Transformer, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        x = ids(10 + i)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def randomize_adapter(model: Transformer, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in adapter_state_dict(model, name).items():
            mod, kind, _ = k.rsplit(".", 2)
            getattr(model.get_submodule(mod), kind)[name].copy_(torch.randn(t.shape, generator=g) * 0.1)


def test_only_adapters_train_and_base_is_untouched():
    r = 4
    model = make_model()
    wrapped = apply_lora(model, LoRAConfig(rank=r, targets=("q_proj", "v_proj")))
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    d = ARGS["d_model"]
    q_out, v_out = ARGS["n_heads"] * ARGS["head_dim"], ARGS["n_kv_heads"] * ARGS["head_dim"]
    expected = ARGS["n_layers"] * r * ((d + q_out) + (d + v_out))
    trainable, total = trainable_parameters(model)
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in make_model().parameters())

    base_before = {k: v.clone() for k, v in base_state_dict(model).items()}
    lora_before = {k: v.clone() for k, v in adapter_state_dict(model, "default").items()}
    train_steps(model, steps=1)
    for k, v in base_state_dict(model).items():
        assert torch.equal(v, base_before[k]), k
    after = adapter_state_dict(model, "default")
    assert any(not torch.equal(after[k], lora_before[k]) for k in after if ".lora_B." in k)


def test_zero_init_b_matches_plain_model():
    plain, model = make_model(), make_model()
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj", "lm_head")))
    assert torch.equal(model(ids()), plain(ids()))
    # the base state dict keeps the original names and loads strictly into a plain model
    sd = base_state_dict(model)
    assert set(sd) == set(plain.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in sd
    make_model(5).load_state_dict(sd, strict=True)


def test_merge_unmerge_and_export_to_plain_model():
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj")))
    train_steps(model, steps=3)
    x = ids()
    unmerged = model(x)
    assert not torch.allclose(unmerged, make_model()(x))  # B moved away from zero
    w0 = {k: v.clone() for k, v in base_state_dict(model).items()}

    merge_lora(model, "default")
    merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    plain = make_model(7)
    plain.load_state_dict(base_state_dict(model), strict=True)
    torch.testing.assert_close(plain(x), merged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model, "default")

    unmerge_lora(model, "default")
    for k, v in base_state_dict(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


def test_two_adapters_on_one_base():
    plain = make_model()
    model = make_model()
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj")), name="a")
    apply_lora(model, LoRAConfig(rank=3, alpha=3, targets=("v_proj", "o_proj")), name="b")
    assert isinstance(model.model.layers[0].self_attn.v_proj, LoRALinear)
    assert model.model.layers[0].self_attn.v_proj.adapters == ["a", "b"]
    randomize_adapter(model, "a", 1)
    randomize_adapter(model, "b", 2)

    # work at the level of one wrapped linear, where deltas add exactly
    lin = model.model.layers[1].self_attn.v_proj
    h = torch.randn(5, ARGS["d_model"])
    base = lin.base(h)
    lin.set_active(["a"])
    out_a = lin(h)
    lin.set_active(["b"])
    out_b = lin(h)
    lin.set_active(["a", "b"])
    out_ab = lin(h)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_b, base) and not torch.allclose(out_a, out_b)
    torch.testing.assert_close(out_ab, base + (out_a - base) + (out_b - base), atol=1e-5, rtol=0)
    torch.testing.assert_close(out_a - base, h @ lin.delta_weight("a").T, atol=1e-5, rtol=0)

    x = ids()
    set_active(model, [])
    torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)
    outs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        set_active(model, names)
        outs[tuple(names)] = model(x)
    assert not torch.allclose(outs[("a",)], outs[("b",)])
    assert not torch.allclose(outs[("a", "b")], outs[("a",)])
    with pytest.raises(KeyError, match="unknown adapters"):
        set_active(model, ["nope"])
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, LoRAConfig(targets=("q_proj",)), name="a")


def test_save_load_round_trip(tmp_path):
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")), name="chat")
    train_steps(model, steps=2)
    x = ids()
    expected = model(x)
    out = save_adapter(model, "chat", tmp_path / "ad")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # no temp files left

    from safetensors.torch import load_file

    saved = load_file(str(out / ADAPTER_WEIGHTS))
    assert set(saved) == set(adapter_state_dict(model, "chat"))
    assert "model.layers.0.self_attn.q_proj.lora_A.chat" in saved
    assert all(".lora_A.chat" in k or ".lora_B.chat" in k for k in saved)
    model_bytes = sum(t.numel() * t.element_size() for t in base_state_dict(model).values())
    assert (out / ADAPTER_WEIGHTS).stat().st_size < model_bytes / 10
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["config"]["rank"] == 4 and meta["name"] == "chat"

    fresh = make_model()  # same seed -> same base
    assert load_adapter(fresh, out) == "chat"
    assert torch.equal(fresh.eval()(x), expected)

    # loading under another name into a model that already has other adapters
    other = make_model()
    apply_lora(other, LoRAConfig(rank=2, targets=("k_proj",)), name="x")
    load_adapter(other, out, name="y")
    set_active(other, ["y"])
    assert torch.equal(other(x), expected)


def test_mismatched_base_raises(tmp_path):
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, "default", tmp_path)
    wrong = make_model(d_model=48, head_dim=24)
    with pytest.raises(ValueError, match="different base model.*q_proj.weight"):
        load_adapter(wrong, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in wrong.modules())  # nothing applied on failure
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        load_adapter(make_model(), tmp_path / "missing")


def test_unknown_target_lists_suffixes():
    with pytest.raises(ValueError, match=r"\['wq'\].*available suffixes.*q_proj") as err:
        apply_lora(make_model(), LoRAConfig(targets=("q_proj", "wq")))
    assert "lm_head" in str(err.value) and "gate_proj" in str(err.value)
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_dropout_only_in_train_mode():
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5, targets=("q_proj", "v_proj")))
    randomize_adapter(model, "default", 3)
    x = ids()
    model.eval()
    e1, e2 = model(x), model(x)
    assert torch.equal(e1, e2)
    model.train()
    torch.manual_seed(0)
    t1 = model(x)
    torch.manual_seed(1)
    t2 = model(x)
    assert not torch.allclose(t1, t2)
    assert not torch.allclose(t1, e1)
