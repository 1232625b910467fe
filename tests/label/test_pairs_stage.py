"""The pairs stage's verb: replies of one model sampled twice, or of two checkpoints, to a prompts file, written as
a candidates file; rerunning the same job keeps it; bad options are usage errors naming them."""

import json

from helpers import tiny_chat_model
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.label.candidates import read_candidates


def _prompts(path, n=5):
    path.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i}.", "answer": str(i)}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


def test_pairs_verb_samples_one_model_or_compares_two(tmp_path):
    ckpt = tiny_chat_model(tmp_path)
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "pairs"
    args = ["pairs", str(ckpt), "-o", str(out), "--prompts", str(prompts), "--limit", "4", "pairs.max_new_tokens=8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    items, skipped = read_candidates(out / "candidates.jsonl")
    assert len(items) == 4 and skipped.count == 0
    assert [r.model for r in items[0].responses] == ["ckpt#1", "ckpt#2"] and items[2].reference == "2"
    assert "4 items from 4 prompts, replies of ckpt#1, ckpt#2" in result.output
    first = (out / "candidates.jsonl").read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0 and (out / "candidates.jsonl").read_bytes() == first

    two = CliRunner().invoke(app, ["pairs", str(ckpt), "-o", str(tmp_path / "two"), "--prompts", str(prompts),
                                   "--checkpoint", f"other={ckpt}", "pairs.max_new_tokens=8"])  # fmt: skip
    assert two.exit_code == 0, two.output
    items, _ = read_candidates(tmp_path / "two" / "candidates.jsonl")
    assert len(items) == 5 and [r.model for r in items[0].responses] == ["ckpt", "other"]

    bad = CliRunner().invoke(app, ["pairs", str(ckpt), "-o", str(tmp_path / "bad"), "--prompts", str(prompts),
                                   "--checkpoint", "nameless"])  # fmt: skip
    assert bad.exit_code == 2 and "--checkpoint wants NAME=DIR, got 'nameless'" in bad.output
    no_prompts = CliRunner().invoke(app, ["pairs", str(ckpt), "-o", str(tmp_path / "none")])
    assert no_prompts.exit_code != 0 and "give a prompts file instead" in str(no_prompts.exception or no_prompts.output)
