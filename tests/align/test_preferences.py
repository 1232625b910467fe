"""Preference data: the readers on the real shared files and on records written here, PandaLM's majority vote and
ties, bad records with their location, and pair rendering through lmforge's and an imported chat template."""

import gzip
import json
from pathlib import Path

import pytest
from helpers import hf_tokenizer_dir, tiny_chat_model

from lmforge.align.preferences import (LabelledReply, PreferencePair, majority, preference_record, read_preferences,
                                       render_pair, render_pairs)  # fmt: skip
from lmforge.finetune.data import BadRecord, Message, Skipped
from lmforge.tokenizer import IGNORE_INDEX, Tokenizer

DATA = Path("/work/shared/data/preference")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared preference data not found at {DATA}")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@needs_data
@pytest.mark.parametrize("name, ties, kept, bad", [
    # hh-rlhf: transcripts with an empty turn, two turns of one speaker in a row, or a rejected side that goes on
    # for another Assistant turn (different prompts); helpful-base also has two pairs with identical replies.
    ("hh-rlhf_harmless-base_test.jsonl.gz", "drop", 2299,
     {"empty content": 4, "consecutive same role": 4, "different prompts": 5}),
    ("hh-rlhf_helpful-base_test.jsonl.gz", "drop", 2333,
     {"empty content": 4, "consecutive same role": 6, "different prompts": 9, "chosen equals rejected": 2}),
    ("llamafactory_dpo_en_demo.json", "drop", 300, {}),
    ("llamafactory_kto_en_demo.json", "drop", 300, {}),
    # PandaLM: 999 records; 105 have a majority of tie votes (85 unanimous + 13 + 7); 6 have a JSON boolean as a
    # response; empty responses (52 among the non-ties, 54 with ties kept) are skipped.
    ("pandalm_testset-v1.json", "drop", 836, {"empty content": 52, "tie": 105, "wrong type": 6}),
    ("pandalm_testset-v1.json", "keep", 939, {"empty content": 54, "wrong type": 6}),
])  # fmt: skip
def test_real_files_counts(name, ties, kept, bad):
    records, skipped = read_preferences(DATA / name, ties=ties)
    assert len(records) == kept and skipped.by_reason == bad and skipped.count == sum(bad.values())
    assert all(r.source.startswith(str(DATA / name)) for r in records)
    if ties == "keep":
        assert sum(r.tie for r in records) == 105 - 2  # two tied records have an empty response


@needs_data
def test_first_hh_rlhf_record_is_split_at_the_last_assistant_turn():
    path = DATA / "hh-rlhf_helpful-base_test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.loads(f.readline())
    pair = read_preferences(path, limit=1)[0][0]
    assert pair.prompt == [Message("user", "Do you know why turkeys became the official food of thanksgiving?")]
    prefix = "\n\nHuman: Do you know why turkeys became the official food of thanksgiving?\n\nAssistant: "
    assert raw["chosen"] == prefix + pair.chosen and raw["rejected"] == prefix + pair.rejected
    assert pair.chosen.startswith("To be honest, I don’t know") and pair.rejected.startswith("I know that the American")
    assert pair.source == f"{path}:1" and not pair.tie


def test_hh_rlhf_multi_turn_and_bad_records(tmp_path):
    turns = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": turns + " Apple.", "rejected": turns + " No."},
        {"chosen": turns + " Apple.", "rejected": "\n\nHuman: Bye\n\nAssistant: No."},
        {"chosen": turns + " Apple."},
        "{not json",
        {"chosen": turns + " Same.", "rejected": turns + " Same."},
        {"chosen": turns + "  ", "rejected": turns + " No."},
    ])  # fmt: skip
    records, skipped = read_preferences(path)
    assert records == [PreferencePair([Message("user", "Hi"), Message("assistant", "Hello!"),
                                       Message("user", "Name a fruit.")], "Apple.", "No.", source=f"{path}:1")]
    where = [e.split(": ", 1)[0] for e in skipped.examples]
    assert skipped.count == 5 and where == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert skipped.by_reason == {"different prompts": 1, "missing key": 1, "invalid JSON": 1,
                                 "chosen equals rejected": 1, "empty content": 1}  # fmt: skip
    # Records before the first that names a format are skipped as unknown; `format=` names it for every record.
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "x"}, {"chosen": turns + " A.", "rejected": turns + " B."}])
    assert read_preferences(other)[1].examples == [
        f"{other}:1: unknown format: keys ['text'] name none of "
        "['hh_rlhf', 'trl', 'llamafactory_dpo', 'llamafactory_kto', 'pandalm', 'lmforge']"]
    assert read_preferences(other, format="hh_rlhf")[1].examples == [f"{other}:1: missing key: 'chosen'"]
    with pytest.raises(ValueError, match="unknown preference format 'dpo'"):
        read_preferences(other, format="dpo")


def test_trl_plain_and_conversational(tmp_path):
    conv_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome.", "id": 7},
        {"prompt": conv_prompt, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"prompt": conv_prompt, "chosen": [{"role": "user", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"prompt": "Q", "chosen": "", "rejected": "A"},
        {"prompt": conv_prompt, "chosen": "4", "rejected": "5"},
    ])  # fmt: skip
    records, skipped = read_preferences(path)
    assert records[0] == PreferencePair([Message("user", "Capital of France?")], "Paris.", "Rome.", id="7",
                                        source=f"{path}:1")  # fmt: skip
    assert records[1] == PreferencePair([Message("system", "Be brief."), Message("user", "2+2?")], "4", "5",
                                        source=f"{path}:2")  # fmt: skip
    assert len(records) == 2 and skipped.by_reason == {"consecutive same role": 1, "empty content": 1, "wrong type": 1}


def test_trl_margin_column(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 2},
        {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"},
        {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 0.25},
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
    ])  # fmt: skip
    records, skipped = read_preferences(path)
    assert [r.margin for r in records] == [2.0, 0.25, None]
    assert skipped.examples == [f"{path}:2: wrong type: 'margin' must be a number, got 'big'"]


def test_llamafactory_dpo_and_kto(tmp_path):
    dpo = tmp_path / "dpo.json"
    dpo.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
         "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"}},
    ]))  # fmt: skip
    records, skipped = read_preferences(dpo)
    assert records == [PreferencePair([Message("system", "S"), Message("user", "Q")], "good", "bad",
                                      source=f"{dpo}[0]")]  # fmt: skip
    assert skipped.examples == [f"{dpo}[1]: wrong type: conversations[1] must be an object, got NoneType"]
    kto = write_jsonl(tmp_path / "kto.jsonl", [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "label": False},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "label": "yes"},
        {"messages": [{"role": "assistant", "content": "A"}], "label": True},
        {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}], "label": True},
    ])  # fmt: skip
    records, skipped = read_preferences(kto)
    assert records == [LabelledReply([Message("user", "Q")], "A", False, source=f"{kto}:1")]
    assert skipped.by_reason == {"wrong type": 1, "no prompt": 1, "no reply": 1}


def test_pandalm_majority_and_ties(tmp_path):
    assert [majority(v) for v in (["1", "1", "2"], [2, 0, 2], ["0", "0", "1"], [1, 1, 1])] == [1, 2, 0, 1]
    with pytest.raises(BadRecord, match="no majority: votes \\[0, 1, 2\\]"):
        majority(["0", "1", "2"])
    with pytest.raises(BadRecord, match="bad vote: annotator2 = '3'"):
        majority(["1", "3", "1"])
    base = {"instruction": "Add", "input": "2 and 2", "response1": "4", "response2": "5"}
    path = tmp_path / "panda.json"
    path.write_text(json.dumps([
        {**base, "idx": 1, "annotator1": "1", "annotator2": "2", "annotator3": "1"},
        {**base, "idx": 2, "annotator1": 2, "annotator2": 2, "annotator3": 0},
        {**base, "idx": 3, "annotator1": "0", "annotator2": "0", "annotator3": "2"},
        {**base, "idx": 4, "annotator1": "0", "annotator2": "1", "annotator3": "2"},
    ]))  # fmt: skip
    prompt = [Message("user", "Add\n\n2 and 2")]
    records, skipped = read_preferences(path)
    assert records == [PreferencePair(prompt, "4", "5", id="1", source=f"{path}[0]"),
                       PreferencePair(prompt, "5", "4", id="2", source=f"{path}[1]")]  # fmt: skip
    assert skipped.by_reason == {"tie": 1, "no majority": 1} and skipped.examples[0].startswith(f"{path}[2]: tie")
    records, skipped = read_preferences(path, ties="keep")
    assert records[2] == PreferencePair(prompt, "4", "5", id="3", source=f"{path}[2]", tie=True)
    assert skipped.by_reason == {"no majority": 1}
    with pytest.raises(ValueError, match="ties must be"):
        read_preferences(path, ties="half")


def test_lmforge_records_round_trip_with_ties_and_both_bad(tmp_path):
    prompt = [Message("system", "Be brief."), Message("user", "Name a colour.")]
    votes = {"source": "human", "votes": [{"annotator": "ann1", "choice": "b"}]}
    records = [preference_record(prompt, "Red.", "Blue.", choice, votes, id=f"c{i}")
               for i, choice in enumerate(["a", "b", "tie", "both_bad"])]  # fmt: skip
    assert records[1]["chosen"] == [{"role": "assistant", "content": "Blue."}] and records[1]["provenance"] == votes
    assert (records[2]["tie"], records[2]["both_bad"], records[3]["tie"], records[3]["both_bad"]) == (1, 0, 0, 1)
    path = write_jsonl(tmp_path / "labels.jsonl", [*records, {**records[0], "tie": "yes"},
                                                    {**records[0], "provenance": "human"}])  # fmt: skip
    kept, skipped = read_preferences(path)
    assert kept == [PreferencePair(prompt, "Red.", "Blue.", id="c0", source=f"{path}:1"),
                    PreferencePair(prompt, "Blue.", "Red.", id="c1", source=f"{path}:2")]  # fmt: skip
    assert skipped.by_reason == {"tie": 1, "both bad": 1, "wrong type": 2}
    kept, skipped = read_preferences(path, ties="keep")
    assert [(p.chosen, p.tie) for p in kept] == [("Red.", False), ("Blue.", False), ("Red.", True), ("Red.", True)]
    assert skipped.by_reason == {"wrong type": 2}
    with pytest.raises(ValueError, match="choice must be one of"):
        preference_record(prompt, "Red.", "Blue.", "left", votes)
    with pytest.raises(ValueError, match="ending with a user message"):
        preference_record(prompt[:1], "Red.", "Blue.", "a", votes)


@pytest.fixture(scope="module")
def native_tok(tmp_path_factory):
    directory = tmp_path_factory.mktemp("native")
    tiny_chat_model(directory)
    return Tokenizer.from_file(directory / "tok.json")


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    pytest.importorskip("transformers")
    return Tokenizer.from_dir(hf_tokenizer_dir(tmp_path_factory.mktemp("chatml"), "chatml"))


def _targets(ids: list[int], labels: list[int]) -> list[int]:
    assert len(ids) == len(labels) and all(label in (i, IGNORE_INDEX) for i, label in zip(ids, labels))
    return [label for label in labels if label != IGNORE_INDEX]


PAIR = PreferencePair([Message("system", "Be kind."), Message("user", "Give me a word.")], "Sunny weather.",
                      "No words for you today, sorry.")  # fmt: skip


def test_render_pair_native(native_tok):
    tok = native_tok
    r = render_pair(tok, PAIR, max_len=128)
    prompt = tok.chat_template.prompt_ids(PAIR.prompt)
    assert r.prompt_len == len(prompt) and not r.truncated
    assert r.chosen_ids[: r.prompt_len] == r.rejected_ids[: r.prompt_len] == prompt
    end = tok.token_to_id("<|end|>")
    assert _targets(r.chosen_ids, r.chosen_labels) == tok.encode(PAIR.chosen) + [end, tok.eos_id]
    assert _targets(r.rejected_ids, r.rejected_labels) == tok.encode(PAIR.rejected) + [end, tok.eos_id]
    assert r.chosen_ids == prompt + tok.encode(PAIR.chosen) + [end, tok.eos_id]
    # Truncation: the reply keeps its head; a prompt tail cut keeps the prompt's last ids.
    short = render_pair(tok, PAIR, max_len=len(prompt) + 2)
    assert short.truncated and short.chosen_ids == prompt + tok.encode(PAIR.chosen)[:2]
    assert short.rejected_labels == [IGNORE_INDEX] * len(prompt) + tok.encode(PAIR.rejected)[:2]
    tail = render_pair(tok, PAIR, max_len=128, max_prompt_len=3)
    assert tail.truncated and tail.prompt_len == 3 and tail.chosen_ids[:3] == prompt[-3:]
    skipped = Skipped()
    long = PreferencePair(PAIR.prompt, "a", "b", source="f.jsonl:9")
    assert render_pairs(tok, [PAIR, long], max_len=len(prompt), skipped=skipped) == []  # PAIR: no room either
    assert skipped.count == 2 and skipped.examples[1].startswith("f.jsonl:9: prompt too long")


def test_render_pair_chatml(chatml_tok):
    tok = chatml_tok
    r = render_pair(tok, PAIR, max_len=256)
    prompt = tok.chat_template.prompt_ids(PAIR.prompt)
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert r.prompt_len == len(prompt) and r.chosen_ids[: r.prompt_len] == r.rejected_ids[: r.prompt_len] == prompt
    im_end = tok.token_to_id("<|im_end|>")
    assert _targets(r.chosen_ids, r.chosen_labels) == tok.encode(PAIR.chosen) + [im_end]
    assert _targets(r.rejected_ids, r.rejected_labels) == tok.encode(PAIR.rejected) + [im_end]
