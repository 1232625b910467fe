"""Reward-model training on the one loop: the toy preference learned through train_reward_model, the loss and its
metrics by hand, a crashed run resuming bit for bit, bad records counted, the `lmforge reward` verb, and two gloo
ranks following one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_chat_model
from safetensors.torch import load_file
from test_reward_model import toy_pairs
from typer.testing import CliRunner

from lmforge.align import rm_train
from lmforge.align.pair_batches import collate_pairs
from lmforge.align.preferences import PreferencePair, render_pair
from lmforge.align.reward_config import RewardConfig
from lmforge.align.reward_model import RewardModel, load_reward_model, score_pairs
from lmforge.align.reward_stage import run_reward
from lmforge.align.rm_train import RM_DIR, reward_loss, train_reward_model
from lmforge.cli import app
from lmforge.finetune.data import Message
from lmforge.model.io import load_checkpoint_tokenizer
from lmforge.train.config import TrainConfig

TRAIN = {"seq_len": 128, "batch_size": 16, "lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0, "compile": False}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("rm_train"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_checkpoint_tokenizer(ckpt)


def write_trl(path, pairs, extra_lines=()):
    """Pairs as TRL prompt/chosen/rejected records (the prompt a plain string), then `extra_lines` as written."""
    lines = [json.dumps({"prompt": p.prompt[0].content, "chosen": p.chosen, "rejected": p.rejected}) for p in pairs]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def weights(directory):
    """Every tensor of a reward-model folder: the backbone's and the head's."""
    rm = load_reward_model(directory)
    return {k: v for k, v in rm.state_dict().items()}


def test_training_learns_the_toy_preference_and_writes_loadable_reward_models(ckpt, tok, tmp_path):
    out = tmp_path / "rm"
    cfg = TrainConfig(**{**TRAIN, "lr": 5e-3}, max_steps=16, ckpt_every=8, eval_every=16)
    m = train_reward_model(ckpt, toy_pairs(96, seed=10), toy_pairs(64, seed=11), out, cfg, seed=0)
    before, after = m["heldout_before"], m["heldout_after"]
    assert 0.25 < before["accuracy"]["value"] < 0.75, before
    assert after["accuracy"]["value"] >= 0.9 and after["accuracy"]["n"] == 64, after
    assert after["accuracy"]["ci95"][0] > before["accuracy"]["ci95"][1]  # the intervals do not overlap
    # The toy replies have equal word counts: length cannot explain the preference.
    assert after["length_baseline"] == before["length_baseline"] and after["length_baseline"]["value"] < 0.75
    assert m["steps"] == 16 and m["train_pairs"] == 96 and m["skipped_pairs"] == 0
    final = m["final_metrics"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "length/chosen",
            "length/rejected"} <= set(final)  # fmt: skip
    # final/ is the reward model: loaded, it scores the held-out pairs as the trained model did.
    loaded = load_reward_model(out / "final")
    rescored = score_pairs(loaded, load_checkpoint_tokenizer(out / "final"), toy_pairs(64, seed=11))
    assert float((rescored.chosen - rescored.rejected).mean()) == pytest.approx(after["mean_margin"], abs=1e-5)
    # every checkpoint holds that step's reward model, the last one equal to final/
    last = out / "checkpoints" / "step_000016" / RM_DIR
    a, b = weights(last), weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17)) and "rewards/accuracy" in records[0]


def test_reward_loss_equals_bradley_terry_by_hand(ckpt, tok):
    torch.manual_seed(0)
    rm = RewardModel.from_checkpoint(ckpt)
    pairs = toy_pairs(4, seed=3)
    rendered = [render_pair(tok, p, 128) for p in pairs]
    batch = collate_pairs(rendered, tok.pad_id)
    loss, metrics = reward_loss(margin=0.5, center_coef=0.01)(rm, batch)
    with torch.no_grad():
        scores = torch.stack([rm(torch.tensor([ids]), torch.tensor([len(ids)]))[0]
                              for ids in [r.chosen_ids for r in rendered] + [r.rejected_ids for r in rendered]])
    c, r = scores[:4], scores[4:]
    expected = (-F.logsigmoid(c - r - 0.5) + 0.01 * (c + r) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    assert float(metrics["rewards/margin"]) == pytest.approx(float((c - r).mean()), abs=1e-6)
    # the reply tokens, its end of turn included
    chosen_len = sum(len(x.chosen_ids) - x.prompt_len for x in rendered) / 4
    rejected_len = sum(len(x.rejected_ids) - x.prompt_len for x in rendered) / 4
    assert float(metrics["length/chosen"]) == pytest.approx(chosen_len)
    assert float(metrics["length/rejected"]) == pytest.approx(rejected_len) and chosen_len != rejected_len
    # per-pair margins (margin="from data") are read at the batch's positions in the PairBatches
    margins = torch.tensor([9.0, 0.1, 0.2, 0.3, 0.4, 9.0])
    per_pair, _ = reward_loss(margins)(rm, {**batch, "index": torch.tensor([4, 3, 2, 1])})
    expected = (-F.logsigmoid(c - r - torch.tensor([0.4, 0.3, 0.2, 0.1]))).mean()
    assert float(per_pair.detach()) == pytest.approx(float(expected), abs=1e-6)


def test_margin_from_data_uses_each_pairs_margin_and_counts_pairs_without_one(ckpt, tmp_path):
    pairs = toy_pairs(9, seed=12)
    for i, pair in enumerate(pairs[:8]):
        pair.margin = 0.5 * i
    cfg = TrainConfig(**{**TRAIN, "batch_size": 4}, max_steps=1)
    m = train_reward_model(ckpt, pairs, [], tmp_path / "out", cfg, margin="from data")
    assert m["train_pairs"] == 8 and m["skipped_by_reason"] == {"no margin": 1} and m["margin"] == "from data"
    assert m["skipped_examples"] == ["toy[8]: no margin: margin='from data' needs each pair's margin (a TRL "
                                     "record's 'margin' key)"]  # fmt: skip


def test_a_crashed_run_resumes_to_the_uninterrupted_weights(ckpt, tmp_path, monkeypatch):
    data = write_trl(tmp_path / "pairs.jsonl", toy_pairs(48, seed=5))
    cfg = RewardConfig(data=str(data), val_fraction=0.25,
                       train={**TRAIN, "batch_size": 8, "max_steps": 8, "ckpt_every": 4, "eval_every": 8})
    reference = run_reward(ckpt, cfg, tmp_path / "reference")
    real, calls = rm_train.reward_loss, []

    def crashing_loss(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def crash_at_step_6(model, batch, ctx=None):
            calls.append(1)
            if len(calls) == 6:  # after the step-4 checkpoint
                raise RuntimeError("simulated crash")
            return loss_fn(model, batch, ctx)

        return crash_at_step_6

    monkeypatch.setattr(rm_train, "reward_loss", crashing_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_reward(ckpt, cfg, tmp_path / "crashed")
    monkeypatch.setattr(rm_train, "reward_loss", real)
    resumed = run_reward(ckpt, cfg, tmp_path / "crashed")
    assert resumed["resumed_from"] == 4 and resumed["heldout_after"] == reference["heldout_after"]
    a, b = weights(tmp_path / "reference" / "final"), weights(tmp_path / "crashed" / "final")
    assert "head.weight" in a and "head.bias" in a and any(k.startswith("backbone.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_records_and_unrenderable_pairs_are_skipped_and_counted(ckpt, tmp_path):
    long_prompt = PreferencePair([Message("user", " ".join(["water"] * 200))], "sun", "the")
    bad = [json.dumps({"prompt": "hello", "chosen": "same", "rejected": "same"}), "{not json"]
    data = write_trl(tmp_path / "pairs.jsonl", [*toy_pairs(20, seed=6), long_prompt], bad)
    cfg = RewardConfig(data=str(data), val_fraction=0.2, train={**TRAIN, "batch_size": 4, "max_steps": 2})
    m = run_reward(ckpt, cfg, tmp_path / "out")
    read = m["read_skipped"]["data"]
    assert read["records"] == 2 and read["by_reason"].get("chosen equals rejected") == 1
    assert any(e.startswith(f"{data}:22: chosen equals rejected") for e in read["examples"]), read["examples"]
    # 21 pairs read, 4 held out (20%), 17 to train on; the long prompt cannot be rendered in max_len 128
    assert m["heldout_pairs"] == 4
    # the seeded split holds the long prompt out: it is counted where it is scored, and training lost nothing
    assert m["train_pairs"] == 17 and m["skipped_pairs"] == 0
    assert m["heldout_before"]["skipped"] == m["heldout_after"]["skipped"] == 1
    assert m["heldout_after"]["accuracy"]["n"] == 3
    # with reward.max_prompt_len the long prompt keeps its tail and the pair counts
    kept = run_reward(ckpt, cfg.model_copy(update={"max_prompt_len": 32}), tmp_path / "kept")
    assert kept["skipped_pairs"] == 0 and kept["heldout_after"]["skipped"] == 0
    assert kept["train_pairs"] + kept["heldout_pairs"] == 21 and kept["max_prompt_len"] == 32


def test_training_pairs_that_are_ties_or_too_long_are_skipped_and_counted(ckpt, tmp_path):
    prompt = [Message("user", "Say something.")]
    tie = PreferencePair(prompt, "the water", "good time", source="votes.json[3]", tie=True)
    long_prompt = PreferencePair([Message("user", " ".join(["water"] * 200))], "sun", "the", source="f.jsonl:9")
    cfg = TrainConfig(**{**TRAIN, "batch_size": 4}, max_steps=1)
    m = train_reward_model(ckpt, [*toy_pairs(8, seed=9), tie, long_prompt], [tie], tmp_path / "out", cfg)
    assert m["train_pairs"] == 8 and m["skipped_pairs"] == 2
    assert m["heldout_ties"] == 1 and m["heldout_pairs"] == 0  # a held-out tie is counted, not scored
    assert m["skipped_by_reason"] == {"tie": 1, "prompt too long": 1}
    first, second = m["skipped_examples"]
    assert first.startswith("votes.json[3]: tie") and second.startswith("f.jsonl:9: prompt too long")
    assert m["heldout_before"] is None and m["heldout_after"] is None and m["steps"] == 1
    with pytest.raises(ValueError, match="none of the 2 training pairs could be rendered"):
        train_reward_model(ckpt, [tie, long_prompt], [], tmp_path / "none", cfg)


def test_the_reward_verb_trains_and_reports(ckpt, tmp_path):
    data = write_trl(tmp_path / "pairs.jsonl", toy_pairs(40, seed=7))
    out = tmp_path / "out"
    args = ["reward", str(ckpt), "--data", str(data), "-o", str(out), "--val-fraction", "0.2", "--margin", "0.1",
            "train.max_steps=3", "train.batch_size=8", "train.compile=false"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out pairwise accuracy (ties half, 95% interval, 8 pairs)" in result.output
    assert "longer answer wins, on the same pairs" in result.output
    assert "32 training pairs (0 skipped), 8 held out; 3 steps" in result.output
    marker = json.loads((out / ".lmforge").read_text())
    assert marker["job"]["config"]["margin"] == 0.1 and marker["job"]["config"]["train"]["max_steps"] == 3
    load_reward_model(out / "final")
    again = CliRunner().invoke(app, args)  # the same job: its checkpoint is the last step, nothing is retrained
    summary = lambda output: [line[line.index("- "):] for line in output.splitlines() if " - " in line]  # noqa: E731
    assert again.exit_code == 0 and "holds this same job" in again.output
    assert summary(again.output)[1:] == summary(result.output)[1:] and len(summary(result.output)) == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    typo = CliRunner().invoke(app, [*args[:6], "train.steps=3"])
    assert typo.exit_code == 2 and "unknown key 'train.steps'" in typo.output
    missing = CliRunner().invoke(app, ["reward", str(ckpt), "--data", str(tmp_path / "none.jsonl"), "-o",
                                       str(tmp_path / "x"), "train.max_steps=1"])  # fmt: skip
    assert missing.exit_code != 0 and "none.jsonl does not exist" in str(missing.exception or missing.output)


def _reward_command(ckpt, data, out, nproc):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "lmforge.cli", "reward", str(ckpt), "--data", str(data), "-o", str(out),
            "--val-fraction", "0.25", "train.max_steps=6", "train.batch_size=8", "train.warmup_steps=1",
            "train.ckpt_every=3", "train.compile=false"]  # fmt: skip


@pytest.mark.slow  # about 40 s on 2 cores: torchrun starts two interpreters
def test_two_ranks_match_one_process(ckpt, tmp_path):
    data = write_trl(tmp_path / "pairs.jsonl", toy_pairs(40, seed=8))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    accuracy_lines = []
    for nproc in (1, 2):
        result = subprocess.run(_reward_command(ckpt, data, tmp_path / f"n{nproc}", nproc), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=300, env=env)  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:]
        accuracy_lines.append([line[line.index("- held-out"):] for line in result.stdout.splitlines()
                               if "pairwise accuracy" in line])  # fmt: skip
    one, two = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("n1", "n2"))  # fmt: skip
    assert [r["step"] for r in two] == list(range(1, 7))
    for x, y in zip(one, two):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
        assert abs(x["rewards/accuracy"] - y["rewards/accuracy"]) < 1e-6
    a, b = weights(tmp_path / "n1" / "final"), weights(tmp_path / "n2" / "final")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    # held-out accuracy before and after, printed by rank 0 of the two (the other rank prints nothing)
    assert len(accuracy_lines[0]) == 1 and accuracy_lines[1] == accuracy_lines[0]
    head = load_file(str(tmp_path / "n2" / "final" / "reward_head.safetensors"))
    assert set(head) == {"weight", "bias"}


def test_the_report_section_shows_accuracy_before_and_after_next_to_the_length_baseline(tmp_path):
    from lmforge.align.reward_stage import REWARD_STAGE
    from lmforge.registry import ReportContext

    acc = lambda value, lo, hi: {"value": value, "n": 200, "ci95": [lo, hi]}  # noqa: E731
    metrics = {"data": "pairs.jsonl", "train_pairs": 800, "skipped_pairs": 3, "heldout_pairs": 200, "steps": 50,
               "train_seconds": 61.04, "heldout_before": {"accuracy": acc(0.5, 0.431, 0.569)},
               "heldout_after": {"accuracy": acc(0.62, 0.551, 0.685), "length_baseline": acc(0.57, 0.5, 0.637)}}
    lines = REWARD_STAGE.report(ReportContext(tmp_path, {"metrics": metrics}, tmp_path, tmp_path))
    assert lines[:3] == ["## Reward model", "", "- data: pairs.jsonl"]
    assert "- 800 training pairs (3 skipped), 200 held out; 50 steps in 61.0 s" in lines
    assert ("- held-out pairwise accuracy (ties half, 95% interval, 200 pairs): 0.500 [0.431, 0.569] before, "
            "0.620 [0.551, 0.685] after") in lines
    assert "- longer answer wins, on the same pairs: 0.570 [0.500, 0.637]" in lines
    assert REWARD_STAGE.order == 54 and REWARD_STAGE.produces == {"reward_model": "final"}


def test_a_recipe_running_the_reward_stage_must_name_its_data():
    from lmforge.recipe import RecipeError, validate_recipe

    stages = ["curate", "tokenizer", "shards", "pretrain", "sft", "reward"]
    with pytest.raises(RecipeError, match="set reward.data to a preference file"):
        validate_recipe({"stages": stages})
    recipe = validate_recipe({"stages": stages, "reward": {"data": "pairs.jsonl", "margin": "from data"}})
    assert recipe.reward.margin == "from data" and recipe.reward.train.lr == 1e-4
