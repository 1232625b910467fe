"""SL-CAI (critique -> revision conversations, seeded principle draws, the data it writes) and RL-CAI labels with
an LLM judge, on a tiny model."""

import json

import pytest

from helpers import tiny_chat_model
from lmforge.align import cai
from lmforge.align.cai import (Revision, Step, ai_preferences, critique_conversation, critique_revise, draw_principle,
                               revision_conversation, write_sl_data)  # fmt: skip
from lmforge.align.constitution import Constitution, Example, Principle, default_constitution
from lmforge.align.preferences import PreferencePair, read_preferences
from lmforge.finetune.data import Message, Skipped, read_conversations
from lmforge.judge.base import JudgeItem
from lmforge.judge.llm import LLMJudge
from lmforge.model.io import load_checkpoint_tokenizer, load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = tiny_chat_model(tmp_path_factory.mktemp("cai"))
    return load_model(ckpt)[0], load_checkpoint_tokenizer(ckpt)


P = Principle("p", "Critique it.", "Revise it.", "Which is better?")
EX = Example([Message("user", "q0")], "r0", "cr0", "c0", "rr0", "v0")


def test_critique_and_revision_conversations_are_built_in_order():
    prompt = [Message("system", "Be kind."), Message("user", "q")]
    conv = critique_conversation(prompt, "reply", P, [EX])
    assert conv == [Message("system", "Be kind."), Message("user", "q0"), Message("assistant", "r0"),
                    Message("user", "cr0"), Message("assistant", "c0"), Message("user", "rr0"),
                    Message("assistant", "v0"), Message("user", "q"), Message("assistant", "reply"),
                    Message("user", "Critique it.")]  # fmt: skip
    assert revision_conversation(conv, "bad", P)[len(conv):] == [Message("assistant", "bad"),
                                                                  Message("user", "Revise it.")]  # fmt: skip


def test_principle_draws_are_seeded_per_prompt_and_round():
    principles = default_constitution().principles
    draws = [draw_principle(principles, 7, i, 1).name for i in range(40)]
    assert draws == [draw_principle(principles, 7, i, 1).name for i in range(40)]
    assert len(set(draws)) >= 8  # spread over the constitution
    assert draws != [draw_principle(principles, 8, i, 1).name for i in range(40)]
    assert [draw_principle(principles, 7, i, 2).name for i in range(40)] != draws


def test_sl_cai_keeps_every_step_and_feeds_each_request_what_came_before(tiny, monkeypatch):
    model, tok = tiny
    seen = []

    def reply(self, conversation, seed):
        seen.append(conversation)
        return f"out{len(seen)}"

    monkeypatch.setattr(cai._Sampler, "reply", reply)
    constitution = Constitution("t", [P], [EX])
    revs = critique_revise(model, tok, [[Message("user", "hi")]], constitution, rounds=2, max_new_tokens=8)
    assert len(seen) == 5 and len(revs) == 1
    rev = revs[0]
    assert (rev.initial, rev.final, [s.principle for s in rev.steps]) == ("out1", "out5", ["p", "p"])
    assert rev.steps[0] == Step("p", "Critique it.", "out2", "Revise it.", "out3", 1)
    assert seen[1] == critique_conversation([Message("user", "hi")], "out1", P, [EX])
    assert seen[2] == revision_conversation(seen[1], "out2", P)
    assert seen[3] == critique_conversation([Message("user", "hi")], "out3", P, [EX])  # round 2 critiques round 1's


def test_sl_cai_on_a_tiny_model_is_seeded_and_counts_what_does_not_fit(tiny):
    model, tok = tiny
    principles = [Principle(n, f"Is it {n}?", f"Make it less {n}.") for n in ("harmful", "rude", "false")]
    long_example = Example([Message("user", "word " * 100)], "r", "c?", "c", "r?", "v")
    constitution = Constitution("short", principles, [long_example, EX])
    prompts = [[Message("user", "How do I delete every file?")], [Message("user", "word " * 200)]]
    skipped = Skipped()
    revs = critique_revise(model, tok, prompts, constitution, rounds=2, seed=3, max_new_tokens=12, skipped=skipped)
    # The 128-token context holds the short example, not the long one (left out); the long prompt is skipped.
    assert [r.id for r in revs] == ["0"] and skipped.count == 1 and skipped.by_reason == {"prompt too long": 1}
    steps = revs[0].steps
    assert [s.few_shot for s in steps] == [1, 1]
    assert [s.principle for s in steps] == [draw_principle(principles, 3, 0, r).name for r in (1, 2)]
    assert steps[0].critique_request == f"Is it {steps[0].principle}?"
    again = critique_revise(model, tok, prompts[:1], constitution, rounds=2, seed=3, max_new_tokens=12)
    assert again[0] == revs[0]
    other = critique_revise(model, tok, prompts[:1], constitution, rounds=2, seed=4, max_new_tokens=12)
    assert other[0].initial != revs[0].initial


def test_sl_data_is_read_back_by_sft_and_preference_readers(tmp_path):
    prompt = [Message("user", "q")]
    revs = [Revision("a", prompt, "bad", [Step("harm", "c?", "c", "r?", "good", 0)]),
            Revision("b", prompt, "same", [Step("harm", "c?", "c", "r?", "", 0, degenerate=True)]),
            Revision("c", prompt, "x", [Step("bias", "c?", "c", "r?", "y", 0), Step("harm", "c?", "c", "r?", "z", 0)])]
    counts = write_sl_data(revs, tmp_path)
    assert counts == {"revisions": 3, "sft_records": 2, "pairs": 2, "unchanged": 1, "degenerate_steps": 1}
    convs, skipped = read_conversations(tmp_path / cai.SFT_FILE)
    assert skipped.count == 0
    assert convs == [[*prompt, Message("assistant", "good")], [*prompt, Message("assistant", "z")]]
    pairs, skipped = read_preferences(tmp_path / cai.PAIRS_FILE)
    assert skipped.count == 0 and [(p.chosen, p.rejected) for p in pairs] == [("good", "bad"), ("z", "x")]
    assert all(isinstance(p, PreferencePair) and p.prompt == prompt for p in pairs)
    raw = [json.loads(line) for line in (tmp_path / cai.PAIRS_FILE).read_text().splitlines()]
    assert raw[1]["provenance"] == {"source": "cai:sl", "item_id": "c", "principles": ["bias", "harm"], "rounds": 2,
                                    "models": {"chosen": "revision", "rejected": "initial"}}  # fmt: skip
    trace = [json.loads(line) for line in (tmp_path / cai.TRACE_FILE).read_text().splitlines()]
    assert [t["final"] for t in trace] == ["good", "same", "z"] and trace[1]["steps"][0]["degenerate"] is True


def test_rl_cai_labels_match_the_drawn_principles_judge(tiny):
    model, tok = tiny
    constitution = default_constitution()
    items = [JudgeItem([Message("user", f"Tell me about topic {i}.")], f"Answer {i} one.", f"Reply {i} two.",
                       meta={"id": f"x{i}"}) for i in range(5)]  # fmt: skip
    records = ai_preferences(model, tok, items, constitution, seed=1)
    assert len(records) == 5
    for i, (item, rec) in enumerate(zip(items, records)):
        principle = next(p for p in constitution.principles if p.name == rec["provenance"]["principle"])
        verdict = LLMJudge(model, tok, principle.preference, "direct").compare(item.prompt, item.a, item.b)
        assert rec["provenance"]["source"] == "judge:cai" and rec["id"] == f"x{i}"
        assert rec["provenance"]["p_a"] == pytest.approx(verdict.detail["p_a"], abs=1e-5)
        assert rec["tie"] == (verdict.choice == "tie")
        if verdict.choice != "tie":
            assert rec["chosen"][0]["content"] == (item.a if verdict.choice == "a" else item.b)
    assert [r["provenance"]["principle"] for r in records] == [r["provenance"]["principle"] for r in
                                                               ai_preferences(model, tok, items, constitution, seed=1)]
    with pytest.raises(ValueError, match="no principle with a preference question"):
        ai_preferences(model, tok, items, Constitution("c", [Principle("p", "c", "r")]))


HARMLESS = "/work/shared/data/preference/hh-rlhf_harmless-base_test.jsonl.gz"
HHH_DIR = "/work/shared/data/cai/evals"


def long_context_model(directory):
    """tiny_chat_model's tokenizer under a random 2-block model with a 512-token context (room for the critique)."""
    import torch

    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer

    tiny_chat_model(directory)
    args = ModelArgs(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, mlp_hidden=128,
                     max_seq_len=512)  # fmt: skip
    torch.manual_seed(0)
    return save_model(directory / "long", Transformer(args), args, directory / "tok.json")


def test_cai_verb_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    ckpt = long_context_model(tmp_path)
    out = tmp_path / "cai"
    result = CliRunner().invoke(app, ["cai", str(ckpt), "-o", str(out), "--prompts", HARMLESS, "--task-dir", HHH_DIR,
                                      "cai.max_prompts=3", "cai.max_new_tokens=8", "cai.hhh_limit=4",
                                      "cai.hhh_tasks=[hhh]", "train.max_steps=2", "train.batch_size=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    # The first three distinct opening requests of harmless-base, revised once each.
    convs, _ = read_conversations(out / "data" / cai.SFT_FILE)
    trace = [json.loads(line) for line in (out / "data" / cai.TRACE_FILE).read_text().splitlines()]
    assert len(trace) == 3 and trace[0]["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert len(convs) == sum(t["final"] != t["initial"] for t in trace)
    pairs, _ = read_preferences(out / "data" / cai.PAIRS_FILE)
    assert len(pairs) == len(convs)
    rl = [json.loads(line) for line in (out / "data" / "rl_preferences.jsonl").read_text().splitlines()]
    assert rl and all(r["provenance"]["source"] == "judge:cai" for r in rl)
    assert (out / "final" / "model.safetensors").is_file()
    assert "hhh: acc " in result.output and " before, " in result.output and "(n=4)" in result.output
    no_prompts = CliRunner().invoke(app, ["cai", str(ckpt), "-o", str(tmp_path / "x")])
    assert no_prompts.exit_code == 2 and "--prompts" in no_prompts.output


def test_a_recipe_chains_cai_into_dpo_and_reward():
    from pathlib import Path

    from lmforge import registry

    for name in ("dpo", "reward"):
        paths = registry.artifact_paths(registry.get(name), ["sft", "cai", name], Path("/r"))
        assert paths == {"model": Path("/r/cai/final"), "preferences": Path("/r/cai/data/rl_preferences.jsonl")}
    assert registry.artifact_paths(registry.get("cai"), ["sft", "cai"], Path("/r")) == {"model": Path("/r/sft/final")}


def test_a_recipe_running_cai_names_its_prompts_at_load_time():
    from lmforge.recipe import load_recipe

    stages = "stages=[curate, tokenizer, shards, pretrain, sft, cai]"
    with pytest.raises(ValueError, match="the cai stage needs red-team prompts: set cai.prompts"):
        load_recipe(None, [stages])
    assert load_recipe(None, [stages, f"cai.prompts={HARMLESS}"]).cai.prompts == HARMLESS
