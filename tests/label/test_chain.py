"""The recipe chain issue 17 exists for: an imported Hugging Face model replies twice to each prompt (pairs), a judge
labels the pairs (judge), and DPO trains on those labels (dpo reads the judge stage's preferences because its own
data is unset); a second run skips everything, and a changed judge setting re-runs the judge and what follows."""

import json

import pytest
from helpers import tiny_hf_chat_model

from lmforge.align.preferences import read_preferences
from lmforge.pipeline import run_recipe
from lmforge.recipe import load_recipe


def test_pairs_then_judge_then_dpo_in_one_recipe(tmp_path):
    pytest.importorskip("transformers")
    model = tiny_hf_chat_model(tmp_path / "hf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a short note number {i}."}) + "\n" for i in range(8)))

    def recipe(*extra: str):
        return load_recipe(None, [
            f"model.init_from={model}", "stages=[import, pairs, judge, dpo, report]", f"run_dir={tmp_path / 'runs'}",
            "name=chain", f"pairs.prompts={prompts}", "pairs.max_new_tokens=12", "pairs.temperature=1.0",
            "dpo.train.max_steps=2", "dpo.train.batch_size=2", "dpo.val_fraction=0.25", "dpo.train.compile=false",
            *extra])  # fmt: skip

    outcomes = run_recipe(recipe())
    assert [(o.stage, o.action) for o in outcomes] == [
        ("import", "ran"), ("pairs", "ran"), ("judge", "ran"), ("dpo", "ran"), ("report", "ran")]
    root = tmp_path / "runs" / "chain"
    labels = root / "judge" / "preferences.jsonl"
    pairs = json.loads((root / "pairs" / "manifest.json").read_text())["metrics"]
    assert pairs["items"] + pairs["skipped"] == 8 and pairs["items"] >= 6  # a random model may reply nothing
    kept, skipped = read_preferences(labels)
    assert len(kept) + skipped.by_reason.get("tie", 0) == pairs["items"] and len(kept) >= 4
    first = json.loads(labels.read_text().splitlines()[0])
    assert first["provenance"]["source"] == "judge:length"
    assert set(first["provenance"]["models"].values()) == {"import#1", "import#2"}  # the stage that made the model
    dpo = json.loads((root / "dpo" / "manifest.json").read_text())["metrics"]
    assert dpo["data"] == str(labels) and (root / "dpo" / "final").is_dir()
    report = (root / "report.md").read_text()
    assert "## Pairs to label" in report and "## AI judge" in report

    assert {o.action for o in run_recipe(recipe())} == {"skipped"}
    changed = run_recipe(recipe("judge.limit=6"))
    assert [(o.stage, o.action) for o in changed] == [
        ("import", "skipped"), ("pairs", "skipped"), ("judge", "re-ran"), ("dpo", "re-ran"), ("report", "re-ran")]
