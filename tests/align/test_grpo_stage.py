"""The grpo stage and `lmforge grpo`: a prompts file trained on with named rewards, the greedy check before and
after in the metrics and the report, resuming the same job, bad settings named; docstring prompts chosen as the
sft stage chooses them; and two gloo ranks following one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_chat_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmforge.align.grpo_config import GRPOConfig
from lmforge.align.grpo_stage import _grpo_report, greedy_check, grpo_prompts
from lmforge.align.prompts import PromptItem
from lmforge.align.rewards import Sample, build_reward, chrf
from lmforge.cli import app
from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids
from lmforge.model.io import load_checkpoint_tokenizer, load_model
from lmforge.registry import ReportContext
from lmforge.stats import proportion

WORDS = ["Give three tips", "Name a color", "Write a list", "Describe water", "Make a plan", "Explain time",
         "List plants", "Say hello", "Tell a story", "Count to five"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("grpo_stage"))


def prompts_file(path):
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in WORDS) + "{broken\n")
    return path


def grpo_args(ckpt, data, out, *extra):
    return ["grpo", str(ckpt), "--prompts", str(data), "-o", str(out), "--reward", "ends_turn=1", "--reward",
            "length=0.5", "--val-fraction", "0.2", "train.max_steps=3", "train.batch_size=2", "train.threads=1",
            "grpo.group_size=4", "grpo.max_new_tokens=6", "grpo.gen_tokens=6", "grpo.reward_options={length_target: 3}",
            *extra]  # fmt: skip


def test_the_grpo_verb_trains_checks_and_reports(ckpt, tmp_path):
    data, out = prompts_file(tmp_path / "p.jsonl"), tmp_path / "out"
    result = CliRunner().invoke(app, grpo_args(ckpt, data, out, "grpo.max_kl=100"))
    assert result.exit_code == 0, result.output
    assert "reward: 1 x ends_turn + 0.5 x length; 8 training prompts x 4 replies; 3 steps" in result.output
    assert "greedy replies to 2 held-out prompts that end their turn" in result.output
    manifest_like = json.loads((out / ".lmforge").read_text())
    assert manifest_like["job"]["config"]["rewards"] == {"ends_turn": 1.0, "length": 0.5}
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward", "reward/ends_turn", "reward/length", "kl", "entropy", "clip_fraction", "heldout_reward",
            "heldout_response_length"} <= set(m)  # fmt: skip
    assert load_model(out / "final")[0] is not None
    again = CliRunner().invoke(app, grpo_args(ckpt, data, out, "grpo.max_kl=100"))
    assert again.exit_code == 0 and "holds this same job" in again.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    bad = CliRunner().invoke(app, grpo_args(ckpt, data, tmp_path / "bad", "grpo.rewards={pass_rate: 1}"))
    assert bad.exit_code == 2 and "grpo.rewards" in bad.output and "completes_function" in bad.output
    weight = CliRunner().invoke(app, [*grpo_args(ckpt, data, tmp_path / "w")[:6], "--reward", "ends_turn=high"])
    assert weight.exit_code == 2 and "--reward 'ends_turn=high': expected NAME=WEIGHT" in weight.output


def test_report_shows_before_and_after_rates(tmp_path):
    metrics = {"prompts_source": "docstring_pairs", "rewards": {"completes_function": 1.0}, "prompts": 100,
               "group_size": 8, "steps": 20, "train_seconds": 61.5, "heldout_prompts": 24,
               "final_metrics": {"reward": 0.5, "response_length": 40.0, "ended_turn": 0.75},
               "check_before": {"ended_turn": 0.375, "reward": 0.25, "mean_new_tokens": 70.0,
                                "completes_function": 0.25, "reference_similarity": 0.3125, "replies": ["a"]},
               "check_after": {"ended_turn": 0.625, "reward": 0.5, "mean_new_tokens": 50.0,
                               "completes_function": 0.5, "reference_similarity": 0.25, "replies": ["b"]}}  # fmt: skip
    lines = _grpo_report(ReportContext(tmp_path, {"metrics": metrics}, tmp_path, tmp_path))
    text = "\n".join(lines)
    assert "- greedy replies to 24 held-out prompts that end their turn: 38% before, 62% after" in text
    assert "- replies that end their turn and complete a function which parses: 25% before, 50% after" in text
    assert "100 training prompts x 8 replies; 20 steps in 61.5 s" in text and "### GRPO sample 1" in text
    assert "mean reply 70.0 -> 50.0 tokens" in text
    assert "- similarity of the replies to the held-out functions' own bodies (chrF): 0.312 before, 0.250 after" in text


def test_greedy_check_counts_ends_and_functions(ckpt):
    tok = load_checkpoint_tokenizer(ckpt)
    model = load_model(ckpt)[0]
    code = "def f(x):\n    \"\"\"Double x.\"\"\""
    items = [PromptItem([Message("user", code)], {"code_prompt": code}) for _ in range(2)]
    ids = [prompt_ids(tok, it.messages) for it in items]
    check = greedy_check(model, tok, items, ids, build_reward({"ends_turn": 1.0}), 5)
    # An untrained model runs on: nothing ends, so nothing completes a function, whatever it wrote.
    assert check["ended_turn"] == 0.0 and check["completes_function"] == 0.0 and check["mean_new_tokens"] == 5.0
    assert check["reward"] == 0.0 and len(check["replies"]) == 2
    assert "reference_similarity" not in check  # no reference body to compare with
    refs = ["    return 2 * x", "    return x + x"]
    items = [PromptItem(it.messages, {**it.meta, "reference": ref}) for it, ref in zip(items, refs)]
    check = greedy_check(model, tok, items, ids, build_reward({"ends_turn": 1.0}), 5)
    expected = (chrf(check["replies"][0], refs[0]) + chrf(check["replies"][1], refs[1])) / 2
    assert check["reference_similarity"] == pytest.approx(expected)


def test_greedy_check_scores_gsm8k_exact_answers_with_an_interval(monkeypatch):
    import lmforge.align.grpo_stage as stage

    items = [PromptItem([Message("user", f"q{i}")], {"answer": a}) for i, a in enumerate(["72", "5", "1200"])]
    # "#### 72" matches; "The answer is 6" names a wrong number; "1,200 cents" matches once normalised.
    replies = ["48 + 24 = 72\n#### 72", "2 + 3 = 5. The answer is 6", "It costs 1,200 cents"]
    monkeypatch.setattr(stage, "greedy_samples", lambda model, tok, its, ids, n: [
        Sample(it, r, ended=True, tokens=4) for it, r in zip(its, replies)])  # fmt: skip
    check = greedy_check(None, None, items, [[1]] * 3, build_reward({"ends_turn": 1.0}), 8)
    # Scored whatever the rewards (here only ends_turn): 2 of 3, with the Wilson 95% interval.
    assert check["reward"] == 1.0
    assert check["exact_match"]["n"] == 3 and check["exact_match"]["value"] == pytest.approx(2 / 3)
    assert check["exact_match"]["ci95"] == pytest.approx([0.2077, 0.9385], abs=1e-4)
    code = [PromptItem([Message("user", "def f():")], {"code_prompt": "def f():"})]
    monkeypatch.setattr(stage, "greedy_samples", lambda model, tok, its, ids, n: [Sample(code[0], "1", True, 1)])
    assert "exact_match" not in greedy_check(None, None, code, [[1]], build_reward({"ends_turn": 1.0}), 8)


def test_report_shows_gsm8k_exact_answers_before_and_after(tmp_path):
    metrics = {"rewards": {"gsm8k_answer": 1.0}, "heldout_prompts": 64,
               "check_before": {"ended_turn": 0.5, "reward": 2 / 64, "exact_match": proportion(2, 64)},
               "check_after": {"ended_turn": 0.5, "reward": 5 / 64, "exact_match": proportion(5, 64)}}  # fmt: skip
    text = "\n".join(_grpo_report(ReportContext(tmp_path, {"metrics": metrics}, tmp_path, tmp_path)))
    assert "- held-out exact final answers: 2/64 = 3.1% [0.9%, 10.7%] before, 5/64 = 7.8% [3.4%, 17.0%] after" in text


def test_docstring_prompts_come_from_the_curated_splits(tmp_path, monkeypatch):
    import lmforge.align.grpo_stage as stage

    seen = {}

    def fake_pairs(curate_dir, tok, sft):
        seen.update(dir=curate_dir, seq_len=sft.train.seq_len, max_pairs=sft.max_pairs, heldout=sft.heldout_pairs)
        return [], [], {"too_long_pairs": 0}

    monkeypatch.setattr(stage, "docstring_pairs", fake_pairs)
    train, held, counts = grpo_prompts(GRPOConfig(max_prompts=50), tmp_path, None, 256)
    assert (train, held) == ([], []) and seen == {"dir": tmp_path, "seq_len": 256, "max_pairs": 50, "heldout": 200}
    with pytest.raises(ValueError, match="grpo.prompts=docstring_pairs derives its prompts from a run's curated"):
        grpo_prompts(GRPOConfig(), None, None, 256)


def test_the_verb_takes_docstring_prompts_from_a_curated_folder(ckpt, tmp_path, monkeypatch):
    import lmforge.align.grpo_stage as stage
    from lmforge.data.code_pairs import function_pairs

    source = "".join(f'def f{i}(x):\n    """Add {i}."""\n    return x + {i}\n' for i in range(6))
    pairs = list(function_pairs(source, "m.py"))
    seen = []
    monkeypatch.setattr(stage, "docstring_pairs", lambda d, tok, sft: (seen.append(d), pairs[:4], pairs[4:], {})[1:])
    args = ["grpo", str(ckpt), "-o", str(tmp_path / "out"), "--reward", "reference_similarity=1", "train.max_steps=1",
            "train.batch_size=2", "train.threads=1", "grpo.group_size=2", "grpo.max_new_tokens=4", "grpo.gen_tokens=4"]
    (tmp_path / "curate").mkdir()
    result = CliRunner().invoke(app, [*args[:2], "--curated", str(tmp_path / "curate"), *args[2:]])
    assert result.exit_code == 0, result.output
    assert seen == [tmp_path / "curate"] and "4 training prompts x 2 replies; 1 steps" in result.output
    assert "similarity of the replies to the held-out functions' own bodies (chrF)" in result.output
    for extra in ([], ["--curated", str(tmp_path), "--prompts", str(prompts_file(tmp_path / "p.jsonl"))]):
        neither = CliRunner().invoke(app, [*args[:2], *extra, *args[2:]])
        assert neither.exit_code == 2 and "give either --prompts FILE or --curated DIR" in neither.output


def _command(ckpt, data, out, nproc):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "lmforge.cli", *grpo_args(ckpt, data, out, "train.batch_size=4", "grpo.beta=0.05",
                                                      "train.ckpt_every=2")]  # fmt: skip


@pytest.mark.slow
def test_two_ranks_match_one_process(ckpt, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    for nproc in (1, 2):
        result = subprocess.run(_command(ckpt, data, tmp_path / f"n{nproc}", nproc), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=300, env=env)  # fmt: skip
        assert result.returncode == 0, result.stdout[-4000:]
    one, two = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("n1", "n2"))  # fmt: skip
    assert [r["step"] for r in two] == [1, 2, 3]
    for x, y in zip(one, two):
        # The same samples (per-prompt seeds), so the same rewards exactly; the loss up to summation order.
        assert x["reward"] == y["reward"] and x["response_length"] == y["response_length"], (x, y)
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["kl"] - y["kl"]) < 1e-6
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("n1", "n2"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert torch.is_tensor(next(iter(a.values())))


@pytest.mark.slow
def test_the_recipe_stage_tunes_the_sft_model_on_docstring_prompts(tmp_path):
    """curate -> ... -> sft -> grpo on a small package: grpo reads sft/final and the curated splits, its held-out
    prompts are sft's generation-check prompts (so its "before" is sft's "after"), and the report has its section."""
    from lmforge.data.readers import stdlib_root
    from lmforge.pipeline import run_recipe
    from lmforge.recipe import load_recipe

    recipe = load_recipe(None, [
        f"data.source={stdlib_root() / 'email'}", "data.val_fraction=0.25", "data.near_dedup=false", "data.pii=false",
        "tokenizer.vocab_size=512", "model.depth=1", "model.max_seq_len=256", "train.seq_len=256",
        "train.batch_size=8", "train.max_steps=20", "train.compile=false", "train.optimizer=adamw",
        "sft.train.max_steps=20", "sft.train.batch_size=8", "sft.train.lr=0.003", "sft.train.compile=false",
        "sft.gen_prompts=6", "sft.gen_tokens=48", "grpo.heldout_size=6", "grpo.gen_tokens=48", "grpo.group_size=4",
        "grpo.max_new_tokens=32", "grpo.max_prompts=40", "grpo.train.max_steps=3", "grpo.train.batch_size=2",
        "stages=[curate, tokenizer, shards, pretrain, sft, grpo, report]", f"run_dir={tmp_path}", "name=r",
    ])  # fmt: skip
    outcomes = run_recipe(recipe)
    assert [o.stage for o in outcomes][-2:] == ["grpo", "report"]
    root = recipe.run_path
    sft = json.loads((root / "sft" / "manifest.json").read_text())["metrics"]
    m = json.loads((root / "grpo" / "manifest.json").read_text())["metrics"]
    assert m["steps"] == 3 and m["prompts_source"] == "docstring_pairs" and m["heldout_prompts"] == 6
    for key in ("ended_turn", "completes_function"):
        assert m["check_before"][key] == sft["generation_after"][key]
    assert (root / "grpo" / "final" / "model.safetensors").is_file()
    assert "## Alignment (GRPO)" in (root / "report.md").read_text()
    # the default rewards: the similarity to each pair's own body is trained on and reported before and after
    assert m["rewards"] == {"completes_function": 1.0, "reference_similarity": 3.0}
    assert "reward/reference_similarity" in m["final_metrics"]
    assert 0 <= m["check_before"]["reference_similarity"] <= 1 and 0 <= m["check_after"]["reference_similarity"] <= 1
    assert "similarity of the replies to the held-out functions' own bodies (chrF)" in (root / "report.md").read_text()
