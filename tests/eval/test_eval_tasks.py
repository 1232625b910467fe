"""Benchmarks on the real task files in ../shared/data/eval: scoring conventions, chance-level behaviour, an
independent cross-check with transformers, bad records, contamination and the score card."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import json_package_run
from lmforge.data.readers import stdlib_root
from lmforge.eval import tasks as T
from lmforge.eval.contamination import ContaminationIndex
from lmforge.eval.perplexity import TextScore, _windows
from lmforge.eval.scorer import encode_pair, load_language_model, loglikelihood, loglikelihood_rolling, rolling_windows
from lmforge.model.io import save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.pretrain import pretrain
from lmforge.eval.config import EvalConfig
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig
from lmforge.stats import proportion

EVAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return json_package_run(tmp_path_factory.mktemp("evaltasks"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A briefly trained checkpoint and its transformers export."""
    from lmforge.hf import export_hf

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(seq_len=64, batch_size=8, max_steps=30, warmup_steps=2, eval_every=30, eval_batches=1,
                      ckpt_every=30, threads=1, compile=False)  # fmt: skip
    pretrain(data / "shards", data / "tokenizer" / "tokenizer.json", ModelConfig(depth=2, d_model=64, max_seq_len=512),
             cfg, out)  # fmt: skip
    return out / "final", export_hf(out / "final", out / "hf")


@pytest.fixture(scope="module")
def random_model(data, tmp_path_factory):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=400, n_layers=2, d_model=64, n_heads=1, n_kv_heads=1, head_dim=64, mlp_hidden=192,
                     max_seq_len=256)  # fmt: skip
    path = tmp_path_factory.mktemp("random") / "model"
    save_model(path, Transformer(args), args, data / "tokenizer" / "tokenizer.json")
    return load_language_model(path, "cpu")


def test_built_in_tasks_read_the_real_files_with_their_prompt_formats():
    arc, skipped = T.load_mc(T.find_task_file("arc_easy", EVAL), T.MC_TASKS["arc_easy"][1])
    assert len(arc) == 2376 and skipped.count == 0
    assert arc[1].contexts[0].startswith("Question: Which piece of safety equipment")
    assert arc[1].contexts[0].endswith("?\nAnswer:") and arc[1].continuations == [" safety goggles", " breathing mask",
                                                                                  " rubber gloves", " lead apron"]
    assert arc[1].gold == 1 and arc[1].lengths == [14, 14, 13, 10]
    wino, _ = T.load_mc(T.find_task_file("winogrande", EVAL), " ")
    assert wino[0].contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria"]  # fmt: skip
    assert wino[0].continuations == [" always got the easier cases."] * 2
    hs, _ = T.load_mc(T.find_task_file("hellaswag", EVAL), " ")
    assert hs[0].continuations[0].startswith(", the man")  # no space before punctuation
    lam, _ = T.load_lambada(T.find_task_file("lambada", EVAL))
    assert len(lam) == 5153 and lam[0][1] == " signs"
    with pytest.raises(T.TaskError, match="unknown task 'mmlu'"):
        T.find_task_file("mmlu", EVAL)


def test_a_random_model_scores_at_chance_on_every_multiple_choice_task(random_model):
    """acc_norm's interval holds chance on all seven tasks. 14 intervals at 95% would miss about one by luck
    alone, so each is widened to 99.3% (Bonferroni over the 7 tasks). Raw accuracy is not asserted: with no
    knowledge, the sum of log-probabilities favours the choice with the fewest tokens, so a random model's raw
    accuracy follows the choices' lengths (OpenBookQA's gold answers run long: raw acc about 0.15)."""
    z = 2.69
    for name, (_, delimiter) in T.MC_TASKS.items():
        examples, _ = T.load_mc(T.find_task_file(name, EVAL), delimiter, limit=300)
        r = T.score_mc(random_model, examples, progress=False)
        low, high = proportion(round(r["acc_norm"]["value"] * r["n"]), r["n"], z=z)["ci95"]
        assert low <= r["chance"] <= high, (name, r["acc_norm"], r["chance"])


def _independent_accuracy(hf_dir: Path, examples: list[T.MCExample]) -> tuple[float, list[float]]:
    """Accuracy computed with transformers alone, on the exported model, following the same pair convention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    correct, logps = 0, []
    for ex in examples:
        scores = []
        for ctx, cont in zip(ex.contexts, ex.continuations):
            ctx_ids = tok.encode(ctx, add_special_tokens=False)
            whole = tok.encode(ctx + cont, add_special_tokens=False)
            ids = [tok.bos_token_id] + whole
            assert len(ids) <= model.config.max_position_embeddings  # no truncation convention to match
            n = len(whole) - len(ctx_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[len(ids) - 1 - n : len(ids) - 1], -1)
            scores.append(float(lp.gather(1, torch.tensor(ids[-n:])[:, None]).sum()))
        logps.extend(scores)
        correct += max(range(len(scores)), key=scores.__getitem__) == ex.gold
    return correct / len(examples), logps


@pytest.mark.parametrize("task,limit", [("hellaswag", None), ("arc_easy", 40), ("arc_challenge", 40)])
def test_accuracy_equals_an_independent_transformers_computation_on_the_export(trained, task, limit):
    checkpoint, hf_dir = trained
    examples, _ = T.load_mc(T.find_task_file(task, EVAL), T.MC_TASKS[task][1], limit=limit)
    ours = T.score_mc(load_language_model(checkpoint, "cpu"), examples, progress=False)
    theirs, logps = _independent_accuracy(hf_dir, examples)
    assert ours["acc"]["value"] == theirs
    # The same scorer on the transformers directory gives the same log-probabilities.
    requests = [(c, x) for ex in examples for c, x in zip(ex.contexts, ex.continuations)]
    via_hf = loglikelihood(load_language_model(hf_dir, "cpu"), requests, progress=False)
    assert max(abs(a - b) for (a, _), b in zip(via_hf, logps)) < 1e-4


def test_pairs_split_where_the_context_tokens_end(trained):
    lm = load_language_model(trained[0], "cpu")
    ctx, cont = encode_pair(lm, "Question: x?\nAnswer: ", "Paris")
    assert ctx == lm.prefix + lm.encode("Question: x?\nAnswer:") and cont == lm.encode("Question: x?\nAnswer: Paris")[len(ctx) - 1 :]
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_pair(lm, "abc", "")


def test_rolling_windows_predict_every_token_once_and_slide_with_a_stride():
    tokens = list(range(1000, 1030))
    for stride in (None, 3, 8):
        windows = rolling_windows(tokens, 8, stride)
        predicted = [t for w, new in windows for t in w[len(w) - new :]]
        assert predicted == tokens[1:]
        assert all(len(w) <= 9 for w, _ in windows)
        if stride == 3:  # every window after the first sees at least 8 - 3 tokens of context
            assert all(len(w) - new >= 5 for w, new in windows[1:])
    ws = list(_windows(iter([(tokens, 30)]), 8, 0, TextScore(0, 0, 0, 0), 4))
    assert [t for _, y in ws for t in y if t != -100] == tokens[1:]


def test_rolling_loglikelihood_equals_the_sum_over_tokens(trained):
    lm = load_language_model(trained[0], "cpu")
    text = (stdlib_root() / "json" / "scanner.py").read_text()[:3000]
    ids = lm.prefix + lm.encode(text)
    assert len(ids) > 2 * lm.max_len  # several windows
    total = loglikelihood_rolling(lm, [text], progress=False)[0]
    expected = 0.0
    for w, new in rolling_windows(ids, lm.max_len):
        with torch.no_grad():
            logp = torch.log_softmax(lm.forward(torch.tensor([w[:-1]]))[0].float(), -1)[len(w) - 1 - new :]
        expected += float(logp.gather(1, torch.tensor(w[len(w) - new :])[:, None]).sum())
    assert total == pytest.approx(expected, abs=1e-3)
    slid = loglikelihood_rolling(lm, [text], stride=lm.max_len // 2, progress=False)[0]
    assert math.isfinite(slid) and slid != total  # more context per token changes the score


def test_bad_records_are_skipped_and_counted_with_their_line(tmp_path):
    f = tmp_path / "mc.jsonl"
    good = {"query": "Q?", "choices": ["a", "b"], "gold": 1}
    f.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"query": "Q", "choices": ["a"], "gold": 0}),
                            json.dumps({"query": "Q", "choices": ["a", "b"], "gold": 5}), "[1, 2]",
                            json.dumps({"question": "x"}), json.dumps(good)]) + "\n")  # fmt: skip
    examples, skipped = T.load_mc(f, " ")
    assert len(examples) == 2 and skipped.count == 5
    assert skipped.examples[0] == f"{f}:2: not JSON (Expecting property name enclosed in double quotes)"
    assert "'choices' must be a list of at least 2 strings" in skipped.examples[1]
    assert "'gold' must be an integer in [0, 2), got 5" in skipped.examples[2]
    assert "needs 'query' and 'choices'" in skipped.examples[4]
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(T.TaskError, match="no valid multiple-choice record"):
        T.load_mc(tmp_path / "bad.jsonl", " ")


def test_gsm8k_answers_are_extracted_and_matched(monkeypatch, tmp_path):
    assert T.extract_number("so she pays 1,234.50 dollars.\n#### 1,234.50") == "1234.5"
    assert T.extract_number("The answer is 42.") == "42" and T.extract_number("no number") is None
    assert T.extract_number("-3 then 7.0") == "7"
    f = tmp_path / "gsm.jsonl"
    f.write_text("\n".join(json.dumps({"question": q, "answer": f"work\n#### {a}"})
                           for q, a in [("2+2?", "4"), ("3*3?", "9"), ("10-1?", "9")]) + "\n")  # fmt: skip
    items, _ = T.load_gsm8k(f)
    assert items == [("2+2?", "4"), ("3*3?", "9"), ("10-1?", "9")]
    monkeypatch.setattr(T, "generate_until", lambda lm, prompts, **kw: [" It is 4.", " 3*3 = 9\n#### 9", " 8"])
    r = T.score_gsm8k(None, items, progress=False)
    assert r["exact_match"]["value"] == pytest.approx(2 / 3) and r["n"] == 3


def test_generation_task_scores_exact_and_normalized_matches(monkeypatch, tmp_path):
    f = tmp_path / "gen.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"prompt": "Capital of France:", "reference": "Paris"},
                                                    {"prompt": "Opposite of hot:", "reference": ["cold", "chilly"]},
                                                    {"prompt": "A fruit:", "reference": "an apple"}]) + "\n")  # fmt: skip
    items, _ = T.load_generation(f)
    monkeypatch.setattr(T, "generate_until", lambda lm, prompts, **kw: [" Paris", " Chilly!", "apple"])
    r = T.score_generation(None, items, progress=False)
    assert r["exact_match"]["value"] == pytest.approx(1 / 3)
    assert r["normalized_match"]["value"] == 1.0


def test_wilson_interval_values():
    r = proportion(50, 100)
    assert r["value"] == 0.5 and r["ci95"] == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert proportion(0, 20)["ci95"][0] == 0.0 and proportion(0, 20)["ci95"][1] == pytest.approx(0.1611, abs=1e-4)


def test_contamination_finds_planted_examples_only():
    examples, _ = T.load_mc(EVAL / "mc" / "arc_easy.jsonl", "\nAnswer: ", limit=200)
    index = ContaminationIndex.build({"arc_easy": [ex.texts for ex in examples]})
    training = ["def f():\n    return 1\n", "notes: " + examples[7].texts[0] + " and more", "unrelated prose " * 20]
    report = index.scan(training)["arc_easy"]
    assert report["contaminated"] == 1 and report["indices"] == [7] and report["training_docs"] == 3
    assert index.scan(["nothing here at all"])["arc_easy"]["contaminated"] == 0


def test_the_eval_command_writes_a_score_card(data, trained, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", str(trained[0]), "--text", str(data / "curate" / "val"), "--tasks",
                                      "arc_easy,lambada,copa", "--task-dir", str(EVAL), "--training-data",
                                      str(data / "curate"), "-o", str(out), "eval.limit=30"])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    arc = results["tasks"]["arc_easy"]
    assert arc["n"] == 30 and arc["acc"]["n"] == 30 and len(arc["acc"]["ci95"]) == 2 and arc["chance"] == 0.25
    assert arc["contamination"]["examples"] == 30 and arc["contamination"]["training_docs"] > 0
    assert results["tasks"]["lambada"]["perplexity"] > 1 and "val_bpb" in results["metrics"]
    assert results["metrics"]["copa/acc"] == results["tasks"]["copa"]["acc"]["value"]
    card = (out / "results.md").read_text()
    assert "| arc_easy | acc_norm |" in card and "| 30 | 0.250 | 0/30 (0.0%) |" in card
    bad = CliRunner().invoke(app, ["eval", str(trained[0])])
    assert bad.exit_code == 2 and "nothing to evaluate" in bad.output


def test_eval_config_defaults_keep_the_default_recipe_unchanged():
    cfg = EvalConfig()
    assert cfg.tasks == [] and cfg.code == [] and cfg.stride is None and cfg.contamination is True


def test_gsm8k_reads_the_real_test_set_and_scores_greedy_generations(trained):
    path = T.find_task_file("gsm8k", EVAL.parent / "instruct")
    assert path.name == "gsm8k_test.jsonl"
    items, skipped = T.load_gsm8k(path)
    assert len(items) == 1319 and skipped.count == 0
    assert items[0][1] == "18"  # Janet's ducks: "#### 18"
    r = T.score_gsm8k(load_language_model(trained[0], "cpu"), items[:4], max_new_tokens=24, progress=False)
    assert r["n"] == 4 and len(r["samples"]) == 3 and 0.0 <= r["exact_match"]["value"] <= 1.0
    assert all("Question:" not in s["completion"] for s in r["samples"])  # cut before the next question
