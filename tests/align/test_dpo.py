"""The DPO family on the loop: the loss with a cached reference equals the one with a frozen reference, DPO and
KTO learn a toy preference (held-out reward accuracy rises), LoRA trains only its adapters, a crashed run resumes
bit for bit, the falling-chosen-reward warning, and `lmforge dpo` end to end (on 2 gloo ranks as in one process)."""

import json
import logging
import os
import random
import subprocess
import sys

import pytest
import torch
from helpers import tiny_chat_model
from safetensors.torch import load_file
from typer.testing import CliRunner

import lmforge.align.dpo as dpo_module
from lmforge.align.dpo import (HELDOUT, KTOBatches, PreferenceLoss, chosen_reward_falling, render_kto, train_dpo,
                               unpair, warn_if_chosen_falls)  # fmt: skip
from lmforge.align.losses import dpo_loss, sequence_logps
from lmforge.align.pair_batches import PairBatches, split_sides
from lmforge.align.preferences import PreferencePair, render_pairs
from lmforge.align.ref_cache import compute_reference
from lmforge.cli import app
from lmforge.finetune.data import Message, Skipped
from lmforge.losses import LossContext
from lmforge.model.io import load_checkpoint_tokenizer, load_model
from lmforge.train.config import TrainConfig

WORDS = ["the", "water", "is", "good", "for", "people", "and", "plants", "time", "list", "make", "three", "new"]
MARK = "sun"  # chosen replies contain it, rejected ones do not


def toy_pairs(n, seed):
    """Pairs whose replies have the same number of words; the chosen one has MARK in a random place."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        k = rng.randint(3, 8)
        rejected = [rng.choice(WORDS) for _ in range(k)]
        chosen = [rng.choice(WORDS) for _ in range(k - 1)]
        chosen.insert(rng.randint(0, k - 1), MARK)
        prompt = [Message("user", " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))))]
        pairs.append(PreferencePair(prompt, " ".join(chosen), " ".join(rejected), source=f"toy[{i}]"))
    return pairs


def cfg(**kw):
    base = dict(batch_size=8, max_steps=24, lr=3e-3, warmup_steps=0, weight_decay=0.0, eval_every=8, ckpt_every=24,
                compile=False, seed=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("dpo"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_checkpoint_tokenizer(ckpt)


@pytest.fixture(scope="module")
def sigmoid_run(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigmoid")
    return out, train_dpo(ckpt, toy_pairs(64, 0), toy_pairs(32, 1), out, cfg(), beta=0.5)


def test_cached_and_frozen_references_give_the_same_loss_and_hand_checked_values(ckpt, tok):
    model, _ = load_model(ckpt)
    pairs = render_pairs(tok, toy_pairs(12, 2), 64, Skipped())
    batch = next(PairBatches(pairs, 6, tok.pad_id, seed=1))
    cache = compute_reference(model, pairs, tok.pad_id, 4)
    for loss_type in ("sigmoid", "robust", "ipo", "kto"):
        if loss_type == "kto":
            batch = {**batch, "desirable": torch.tensor([True, False] * 3)}
        cached = PreferenceLoss(loss_type, beta=0.3, label_smoothing=0.1, reference=cache)(model, batch)
        frozen = PreferenceLoss(loss_type, beta=0.3, label_smoothing=0.1)(
            model, batch, LossContext(tokens=6, frozen={"reference": load_model(ckpt)[0]}))
        torch.testing.assert_close(cached[0], frozen[0], rtol=0, atol=1e-6)
        assert cached[1]["kl"] == 0 and frozen[1]["rewards/margin"] == 0  # the policy is still the reference
    # policy = reference: every DPO pair costs log 2, IPO's (0 - 1/(2 beta))^2
    assert abs(PreferenceLoss("sigmoid", reference=cache)(model, batch)[0].item() - 0.6931472) < 1e-6
    assert abs(PreferenceLoss("ipo", beta=0.25, reference=cache)(model, batch)[0].item() - 4.0) < 1e-5
    # IPO and SimPO on per-token means, against the plain loss functions on the model's own numbers
    with torch.no_grad():
        logp, n = sequence_logps(model(batch["input_ids"]), batch["labels"])
    (c, r), (nc, nr) = split_sides(logp), split_sides(n)
    shifted = (c / nc - 0.5, r / nr)  # a reference whose chosen side is 0.5 nats per token less likely
    fake = type(cache)(cache.chosen_logp - 0.5 * cache.chosen_tokens, cache.chosen_tokens, cache.rejected_logp,
                       cache.rejected_tokens)  # fmt: skip
    ipo, metrics = PreferenceLoss("ipo", beta=0.25, reference=fake)(model, batch)
    expected, _ = dpo_loss(c / nc, r / nr, *shifted, beta=0.25, loss_type="ipo")
    torch.testing.assert_close(ipo, expected)
    assert metrics["length/chosen"] == nc.float().mean() and metrics["length/rejected"] == nr.float().mean()
    assert abs(float(metrics["kl"]) - 0.5) < 1e-5  # the chosen log-ratio per chosen token
    simpo, m = PreferenceLoss("simpo", beta=2.0, gamma=0.5)(model, batch)
    expected = -torch.nn.functional.logsigmoid(2.0 * (c / nc - r / nr) - 0.5).mean()
    torch.testing.assert_close(simpo, expected)
    assert "kl" not in m


def test_dpo_raises_heldout_reward_accuracy_on_a_toy_preference(sigmoid_run):
    out, m = sigmoid_run
    before, after = m["heldout_before"], m["heldout_after"]
    assert before[HELDOUT + "rewards/margin"] == 0 and abs(before[HELDOUT + "loss"] - 0.6931472) < 1e-5
    assert after[HELDOUT + "rewards/accuracy"] >= 0.9 and after[HELDOUT + "rewards/margin"] > 1
    assert after[HELDOUT + "loss"] < 0.3 and not m["chosen_reward_falling"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert {"rewards/chosen", "rewards/margin", "rewards/accuracy", "kl", "length/chosen", "length/rejected"} <= set(
        records[0])
    assert [r["step"] for r in records if HELDOUT + "rewards/margin" in r] == [8, 16, 24]
    assert sorted(p.name for p in (out / "reference").iterdir()) == ["heldout", "train"]
    load_model(out / "final")


def test_lora_trains_only_the_adapters_and_final_loads_merged(ckpt, tmp_path):
    from lmforge.model.lora import LoRAConfig

    m = train_dpo(ckpt, toy_pairs(32, 0), toy_pairs(16, 1), tmp_path, cfg(max_steps=12, ckpt_every=6, lr=1e-2),
                  beta=0.5, method="lora", lora=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "lm_head")),
                  reference="frozen")  # fmt: skip
    assert m["trainable_params"] < m["total_params"] / 5
    assert m["heldout_after"][HELDOUT + "rewards/margin"] > 0.1
    base = load_file(str(ckpt / "model.safetensors"))
    live = load_file(str(tmp_path / "checkpoints" / "step_000012" / "model.safetensors"))
    frozen = {k.replace(".base.", "."): v for k, v in live.items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(v, base[k]) for k, v in frozen.items())
    assert any(k.startswith("lm_head") and "lora_B" in k and live[k].abs().max() > 0 for k in live)
    merged, _ = load_model(tmp_path / "final")
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert not torch.equal(merged.lm_head.weight, base["lm_head.weight"])  # the adapters are merged in


def test_kto_learns_the_desirable_replies(ckpt, tok, tmp_path):
    labelled = unpair(toy_pairs(4, 3))
    assert [r.desirable for r in labelled] == [True, False] * 4
    pairs, desirable = render_kto(tok, labelled, 64, Skipped(), seed=0)
    # each example's second side: another example's reply after the same prompt, never its own
    assert all(p.chosen_ids[: p.prompt_len] == p.rejected_ids[: p.prompt_len] for p in pairs)
    assert sum(p.chosen_ids == p.rejected_ids for p in pairs) == 0 and desirable == [True, False] * 4
    cut, _ = render_kto(tok, labelled, 64, Skipped(), seed=0, max_prompt_len=3)
    assert [p.prompt_len for p in cut] == [min(3, p.prompt_len) for p in pairs]  # a long prompt keeps its tail
    assert all(c.chosen_ids[: c.prompt_len] == p.chosen_ids[p.prompt_len - c.prompt_len : p.prompt_len]
               for c, p in zip(cut, pairs))  # fmt: skip
    batch = next(KTOBatches(pairs, desirable, 4, tok.pad_id, seed=0))
    assert batch["desirable"].tolist() == [desirable[i] for i in batch["index"].tolist()]
    m = train_dpo(ckpt, toy_pairs(48, 0), toy_pairs(16, 1), tmp_path, cfg(max_steps=16), loss_type="kto", beta=0.5)
    after = m["heldout_after"]
    assert m["heldout_before"][HELDOUT + "rewards/margin"] == 0 and after[HELDOUT + "rewards/margin"] > 1
    assert after[HELDOUT + "rewards/accuracy"] >= 0.7 and m["train_pairs"] == 96


def test_a_crashed_run_resumes_to_the_uninterrupted_weights(ckpt, tmp_path, monkeypatch):
    run = lambda out: train_dpo(ckpt, toy_pairs(32, 0), toy_pairs(8, 1), out, cfg(max_steps=8, ckpt_every=4,  # noqa: E731
                                                                                  eval_every=4), beta=0.5)
    reference = run(tmp_path / "reference")
    real, calls = PreferenceLoss.__call__, []

    def crashing(self, model, batch, ctx=None):
        if torch.is_grad_enabled():  # a training step, not a held-out evaluation
            calls.append(1)
            if len(calls) == 6:  # step 6: after the step-4 checkpoint
                raise RuntimeError("simulated crash")
        return real(self, model, batch, ctx)

    monkeypatch.setattr(PreferenceLoss, "__call__", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed")
    monkeypatch.setattr(PreferenceLoss, "__call__", real)
    resumed = run(tmp_path / "crashed")
    assert resumed["resumed_from"] == 4 and resumed["heldout_after"] == reference["heldout_after"]
    a, b = (load_file(str(tmp_path / d / "final/model.safetensors")) for d in ("reference", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_falling_chosen_reward_warning(caplog):
    assert chosen_reward_falling([0.0, -0.1, -0.3, -0.6], 3)
    assert not chosen_reward_falling([0.0, 0.2, 0.5, 0.9], 3)  # rising
    assert not chosen_reward_falling([0.0, -0.1, -0.05, -0.6], 3)  # not at each of the last 3
    assert not chosen_reward_falling([0.0, 0.9, 0.5, 0.3, 0.1], 3)  # falling, but still above its start
    assert not chosen_reward_falling([0.0, -0.1, -0.2], 3)  # too few evaluations to say
    with caplog.at_level(logging.WARNING, logger="lmforge.align.dpo"):
        assert not warn_if_chosen_falls([0.0, 0.2, 0.5, 0.9], 3) and not caplog.records
        assert warn_if_chosen_falls([0.0, -0.1, -0.3, -0.6], 3)
    assert "chosen reward fell at each of the last 3 evaluations" in caplog.text and "label_smoothing" in caplog.text


def write_pairs(path, pairs):
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt[0].content, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def test_the_verb_end_to_end(ckpt, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", toy_pairs(40, 0))
    args = ["dpo", str(ckpt), "--data", str(data), "-o", str(tmp_path / "out"), "--loss", "ipo", "--beta", "0.5",
            "--reference", "frozen", "--val-fraction", "0.2", "train.max_steps=6", "train.batch_size=8",
            "train.warmup_steps=0", "train.lr=3e-3", "train.eval_every=3", "train.compile=false", "dpo.max_prompt_len=64"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "loss ipo (beta 0.5), method full, reference frozen; 32 training and 8 held-out" in result.output
    load_model(tmp_path / "out" / "final")
    bad = CliRunner().invoke(app, [*args[:6], "--loss", "orpo"])
    assert bad.exit_code == 2 and "loss" in bad.output


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(ckpt, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", toy_pairs(40, 0))
    outs = []
    for nproc in (1, 2):
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                       if nproc > 1 else [])  # fmt: skip
        out = tmp_path / f"n{nproc}"
        cmd = [*launcher, "-m", "lmforge.cli", "dpo", str(ckpt), "--data", str(data), "-o", str(out), "--beta", "0.5",
               "train.max_steps=6", "train.batch_size=8", "train.warmup_steps=0", "train.lr=3e-3",
               "train.eval_every=3", "train.compile=false"]  # fmt: skip
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                                env=_env())  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:]
        outs.append(out)
    ra, rb = ([json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in outs)
    assert len(ra) == len(rb) == 6
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margin"] - y["rewards/margin"]) < 1e-5
        assert abs(x.get(HELDOUT + "rewards/margin", 0) - y.get(HELDOUT + "rewards/margin", 0)) < 1e-5
    wa, wb = (load_file(str(o / "final" / "model.safetensors")) for o in outs)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
