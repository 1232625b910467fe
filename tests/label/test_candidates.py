"""Candidates: the file format's round trip and bad records, reading preference files as candidates with their known
labels (the real PandaLM and hh-rlhf files), and replies generated from checkpoints, seeded and reproducible."""

import json
from pathlib import Path

import pytest
from helpers import tiny_chat_model

from lmforge.align.prompts import PromptItem
from lmforge.finetune.data import Message
from lmforge.label.candidates import Candidate, Response, pairs_of, read_candidates, write_candidates
from lmforge.label.generate import generate_candidates

DATA = Path("/work/shared/data/preference")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared preference data not found at {DATA}")


def test_round_trip_pairs_and_bad_records(tmp_path):
    items = [Candidate("q1", [Message("system", "Be brief."), Message("user", "Hi <b>there</b>")],
                       [Response("m1", "Hello."), Response("m2", "Hey!"), Response("m3", "Yo")], "42",
                       {"label": "b"}),
             Candidate("q2", [Message("user", "Sum 2+2")], [Response("m1", "4"), Response("m2", "5")])]  # fmt: skip
    path = tmp_path / "c.jsonl"
    write_candidates(path, items)
    with path.open("a") as f:
        for bad in ({"id": "q3", "prompt": [{"role": "user", "content": "x"}], "responses": [{"model": "a",
                     "content": "y"}]}, {"id": "q1", "prompt": [{"role": "user", "content": "x"}],
                     "responses": [{"model": "a", "content": "y"}, {"model": "b", "content": "z"}]},
                    {"id": "q4", "prompt": [{"role": "user", "content": "x"}],
                     "responses": [{"model": "a", "content": " "}, {"model": "b", "content": "z"}]},
                    {"id": "q5", "prompt": [{"role": "user", "content": "x"}], "meta": {"label": "left"},
                     "responses": [{"model": "a", "content": "y"}, {"model": "b", "content": "z"}]}):  # fmt: skip
            f.write(json.dumps(bad) + "\n")
    back, skipped = read_candidates(path)
    assert [(c.id, c.prompt, c.responses, c.reference, c.meta) for c in back] == [
        (c.id, c.prompt, c.responses, c.reference, c.meta) for c in items]
    assert back[0].source == f"{path}:1" and back[0].label == "b" and back[1].label is None
    assert skipped.by_reason == {"too few responses": 1, "duplicate id": 1, "empty content": 1, "wrong type": 1}
    assert f"{path}:4: duplicate id: 'q1' appears earlier in the file" in skipped.examples
    assert pairs_of(back[0]) == [(0, 1), (0, 2), (1, 2)] and pairs_of(back[1]) == [(0, 1)]


@needs_data
def test_pandalm_keeps_the_annotators_order_and_majority():
    items, skipped = read_candidates(DATA / "pandalm_testset-v1.json")
    # 999 records: 6 have a JSON boolean as a response and 54 an empty one; the rest all have a majority.
    assert len(items) == 939 and skipped.by_reason == {"empty content": 54, "wrong type": 6}
    labels = [c.label for c in items]
    assert (labels.count("a"), labels.count("b"), labels.count("tie")) == (394, 442, 103)
    assert [r.model for r in items[0].responses] == ["response1", "response2"]
    raw = json.loads((DATA / "pandalm_testset-v1.json").read_text())[0]
    assert items[0].id == str(raw["idx"]) and items[0].responses[0].content == raw["response1"]


@needs_data
def test_hh_rlhf_pairs_become_chosen_then_rejected():
    items, _ = read_candidates(DATA / "hh-rlhf_helpful-base_test.jsonl.gz", limit=20)
    assert len(items) == 20 and all(c.label == "a" for c in items)
    assert all([r.model for r in c.responses] == ["chosen", "rejected"] for c in items)
    assert all(c.prompt[-1].role == "user" for c in items)


def test_generate_candidates_is_seeded_and_skips_long_prompts(tmp_path):
    ckpt = tiny_chat_model(tmp_path)
    prompts = [PromptItem([Message("user", "Give three tips for staying healthy.")], {"id": "t1", "answer": "7"}),
               PromptItem([Message("user", "word " * 400)], {"source": "long.jsonl:2"}),
               PromptItem([Message("user", "Name a colour.")], {})]  # fmt: skip
    checkpoints = {"first": ckpt, "second": ckpt}
    items, skipped = generate_candidates(prompts, checkpoints, max_new_tokens=12, temperature=1.0, seed=3)
    assert [c.id for c in items] == ["t1", "p2"] and skipped.by_reason == {"too long": 1}
    assert skipped.examples[0].startswith("long.jsonl:2: too long")
    assert items[0].reference == "7" and items[0].meta == {"answer": "7"}
    assert [r.model for r in items[0].responses] == ["first", "second"]
    # The same checkpoint under two names samples with different seeds; a rerun writes the same replies.
    assert items[0].responses[0].content != items[0].responses[1].content
    again, _ = generate_candidates(prompts, checkpoints, max_new_tokens=12, temperature=1.0, seed=3)
    assert [c.responses for c in again] == [c.responses for c in items]
    with pytest.raises(ValueError, match="at least two checkpoints"):
        generate_candidates(prompts, {"only": ckpt})
