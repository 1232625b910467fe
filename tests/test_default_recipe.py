"""The default recipe as a user runs it: minutes long, so marked slow (`pytest -m slow`)."""

import json

import pytest

from lmforge.pipeline import run_recipe
from lmforge.recipe import load_recipe


@pytest.mark.slow
def test_default_recipe_beats_xz_and_writes_a_report(tmp_path):
    recipe = load_recipe(None, [f"run_dir={tmp_path}"])
    outcomes = run_recipe(recipe)
    assert [o.action for o in outcomes] == ["ran"] * 8
    ev = json.loads((tmp_path / "stdlib-code" / "eval" / "manifest.json").read_text())["metrics"]
    assert ev["val_bpb"] < ev["xz_bpb"], f"model {ev['val_bpb']:.3f} bits/byte vs xz {ev['xz_bpb']:.3f}"
    pre = json.loads((tmp_path / "stdlib-code" / "pretrain" / "manifest.json").read_text())["metrics"]
    assert pre["mfu"] > 0.4 and pre["skipped_steps"] == 0
    samples = json.loads((tmp_path / "stdlib-code" / "eval" / "results.json").read_text())["samples"]
    text = "".join(s["prompt"] + s["completion"] for s in samples)
    assert "\n    " in text, "sampled code should be indented like Python"
    # Fine-tuning on docstring -> body pairs lowers their held-out loss, and more greedy replies end their turn
    # with a body that parses, instead of running on to the token limit.
    sft = json.loads((tmp_path / "stdlib-code" / "sft" / "manifest.json").read_text())["metrics"]
    assert sft["heldout_loss_after"] < sft["heldout_loss_before"] - 0.5
    assert sft["generation_after"]["ended_turn"] >= sft["generation_before"]["ended_turn"] + 0.25
    assert sft["generation_after"]["completes_function"] > sft["generation_before"]["completes_function"]
