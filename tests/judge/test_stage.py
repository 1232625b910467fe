"""The judge stage and `lmforge judge`: candidates in, `lmforge` preference records out (read back by
read_preferences), agreement with known labels, the settings, and the stage in a run fed by a candidates producer."""

import json

import pytest
from helpers import tiny_chat_model
from typer.testing import CliRunner

from lmforge import registry
from lmforge.align.preferences import read_preferences
from lmforge.cli import app
from lmforge.finetune.data import Message
from lmforge.judge.base import LengthJudge
from lmforge.judge.stage import JudgeConfig, judge_candidates, run_judge
from lmforge.label.candidates import Candidate, Response, write_candidates
from lmforge.pipeline import run_recipe
from lmforge.recipe import RecipeError, validate_recipe
from lmforge.registry import Stage, StageContext

PROMPT = [Message("user", "Name a colour.")]


def three_models() -> list[Candidate]:
    """Two items, three responses each: three pairs per item."""
    return [Candidate("c1", PROMPT, [Response("sft", "Red."), Response("grpo", "Blue, like the sky."),
                                     Response("base", "Green")]),
            Candidate("c2", PROMPT, [Response("sft", "A long answer: yellow."), Response("grpo", "Pink."),
                                     Response("base", "Puce.")], meta={"label": "a"})]  # fmt: skip


def test_every_pair_becomes_a_record_with_provenance_read_back_by_read_preferences(tmp_path):
    items = tmp_path / "candidates.jsonl"
    write_candidates(items, three_models())
    m = run_judge(items, JudgeConfig(judge="length"), tmp_path / "prefs.jsonl")
    assert (m["items"], m["pairs"], m["records"]) == (2, 6, 6)
    assert m["choices"] == {"b": 2, "a": 3, "tie": 1}
    records = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    first = records[0]  # c1, responses 0 (sft, "Red.") and 1 (grpo, the longer)
    assert first["id"] == "c1/0-1" and first["chosen"] == [{"role": "assistant", "content": "Blue, like the sky."}]
    assert first["provenance"] == {"source": "judge:length", "item_id": "c1",
                                   "models": {"chosen": "grpo", "rejected": "sft"},
                                   "votes": [{"annotator": "judge:length", "choice": "b", "lengths": [4, 19]}]}
    tie = records[5]  # c2: grpo's and base's replies are as long
    assert tie["tie"] is True and tie["provenance"]["models"] == {"chosen": "grpo", "rejected": "base"}
    pairs, skipped = read_preferences(tmp_path / "prefs.jsonl")
    assert skipped.count == 1 and skipped.by_reason == {"tie": 1}  # read_preferences drops ties unless kept
    assert [(p.chosen, p.rejected) for p in pairs][:2] == [("Blue, like the sky.", "Red."), ("Green", "Red.")]
    kept, _ = read_preferences(tmp_path / "prefs.jsonl", ties="keep")
    assert len(kept) == 6 and kept[5].tie
    # c2's known label compares its responses 0 and 1: the length judge agrees (1 of 1 labelled pair)
    assert (m["agreement"]["n"], m["agreement"]["accuracy"]) == (1, 1.0)


def test_agreement_with_known_labels_accuracy_and_kappa(tmp_path):
    labelled = [Candidate(str(i), PROMPT, [Response("x", a), Response("y", b)], meta={"label": label})
                for i, (a, b, label) in enumerate([("long reply", "s", "a"), ("s", "long reply", "b"),
                                                   ("long reply", "s", "b"), ("same", "same", "tie")])]  # fmt: skip
    _, m = judge_candidates(LengthJudge(), labelled)
    # judge: a, b, a, tie; people: a, b, b, tie -> 3 of 4; kappa: p_o 0.75, p_e (2*1 + 1*2 + 1*1)/16 = 5/16
    assert m["agreement"]["n"] == 4 and m["agreement"]["accuracy"] == 0.75
    assert m["agreement"]["kappa"] == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))


def test_judge_settings_are_checked():
    assert JudgeConfig(judge="verifier:gsm8k_answer").judge == "verifier:gsm8k_answer"
    with pytest.raises(ValueError, match="unknown judge kind 'gpt'"):
        JudgeConfig(judge="gpt:4")
    with pytest.raises(ValueError, match="judge 'llm' needs a spec: llm:DIR"):
        JudgeConfig(judge="llm")


def test_the_cli_verb_with_an_llm_judge_and_a_rubric_file(tmp_path):
    ckpt = tiny_chat_model(tmp_path)
    items = tmp_path / "candidates.jsonl"
    write_candidates(items, three_models())
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Prefer the colour.\n")
    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(app, ["judge", str(items), "-o", str(out), "--judge", f"llm:{ckpt}", "--rubric",
                                      str(rubric), "--batch-size", "2", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    vote = records[0]["provenance"]["votes"][0]
    assert vote["annotator"] == f"judge:llm:{ckpt}" and {"p_a_first", "p_a_second", "p_a"} <= set(vote)
    p_first, p_second = vote["p_a_first"], vote["p_a_second"]
    assert vote["choice"] == ("a" if min(p_first, p_second) > 0.5 else "b" if max(p_first, p_second) < 0.5 else "tie")
    bad = CliRunner().invoke(app, ["judge", str(items), "-o", str(out), "--judge", "oracle"])
    assert bad.exit_code == 2 and "unknown judge kind 'oracle'" in bad.output


def _write_candidates(ctx: StageContext) -> dict:
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_candidates(ctx.out / "candidates.jsonl", three_models())
    return {"items": 2}


PAIRS = Stage(name="toy_pairs", order=46, run=_write_candidates, produces={"candidates": "candidates.jsonl"},
              default=False)  # fmt: skip


def test_the_judge_stage_in_a_run_labels_the_candidates_it_is_given(tmp_path):
    def recipe(*overrides: str):
        stages = ["toy_pairs", "judge", "report"]
        return validate_recipe({"name": "j", "run_dir": str(tmp_path / "runs"), "stages": stages},
                               overrides=list(overrides))  # fmt: skip

    with registry.registered(PAIRS):
        outcomes = run_recipe(recipe("judge.judge=length"))
        assert [(o.stage, o.action) for o in outcomes] == [("toy_pairs", "ran"), ("judge", "ran"), ("report", "ran")]
        assert outcomes[1].metrics["records"] == 6
        report = (tmp_path / "runs" / "j" / "report.md").read_text()
        assert "## AI judge\n\n- length: 6 preferences from 6 pairs of 2 items" in report
        prefs = tmp_path / "runs" / "j" / "judge" / "preferences.jsonl"
        assert len(read_preferences(prefs, ties="keep")[0]) == 6
        again = run_recipe(recipe("judge.judge=length", "judge.batch_size=2"))  # speed only: skipped
        assert [o.action for o in again] == ["skipped", "skipped", "skipped"]
        changed = run_recipe(recipe("judge.judge=verifier:code_parses"))
        assert [o.action for o in changed] == ["skipped", "re-ran", "re-ran"]
        assert changed[1].metrics["judge"] == "verifier:code_parses"
    with pytest.raises(RecipeError, match="judge.judge"):
        recipe("judge.judge=oracle")


def test_an_llm_judge_asks_a_constitution_principles_preference_question(tmp_path):
    from lmforge.align.constitution import default_constitution
    from lmforge.judge.stage import instruction

    honesty = next(p for p in default_constitution().principles if p.name == "honesty")
    assert instruction(JudgeConfig(judge="llm:x", constitution="default", principle="honesty")) == honesty.preference
    first = next(p for p in default_constitution().principles if p.preference)
    assert instruction(JudgeConfig(judge="llm:x", constitution="default")) == first.preference
    assert instruction(JudgeConfig(judge="llm:x", rubric="Be brief.")) == "Be brief."
    with pytest.raises(ValueError, match=r"no principle 'tact' with a preference question \(those with one: \['harm'"):
        instruction(JudgeConfig(judge="llm:x", constitution="default", principle="tact"))
    with pytest.raises(ValueError, match="both set"):
        instruction(JudgeConfig(judge="llm:x", constitution="default", rubric="Be brief."))


def test_the_judge_stage_labels_what_the_pairs_stage_wrote(tmp_path):
    """The real pairs stage (a tiny model's two sampled replies per prompt) feeds the judge stage's function."""
    from lmforge import verbs
    from lmforge.judge.stage import JUDGE_STAGE
    from lmforge.label.pairs_config import PairsConfig
    from lmforge.label.pairs_stage import run_pairs

    ckpt = tiny_chat_model(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "answer": str(i + 1)}) + "\n"
                               for i in range(3)))  # fmt: skip
    run_pairs(ckpt, PairsConfig(prompts=str(prompts), max_new_tokens=6), tmp_path / "pairs")
    settings = validate_recipe({"judge": {"judge": f"llm:{ckpt}", "device": "cpu"}})
    m = verbs.run_stage(JUDGE_STAGE, settings, tmp_path / "judge", candidates=tmp_path / "pairs" / "candidates.jsonl")
    assert (m["items"], m["pairs"], m["records"]) == (3, 3, 3) and sum(m["choices"].values()) == 3
    records = [json.loads(line) for line in (tmp_path / "judge" / "preferences.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"{r['provenance']['item_id']}/0-1" for r in records]
    assert all(set(r["provenance"]["models"].values()) == {"ckpt#1", "ckpt#2"} for r in records)
