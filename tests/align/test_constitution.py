"""Constitutions: lmforge's YAML (the shipped default, bad files) and the CAI paper's published prompt files."""

import json
from pathlib import Path

import pytest

from lmforge.align.constitution import ConstitutionError, Principle, default_constitution, load_constitution
from lmforge.finetune.data import Message

CAI = Path("/work/shared/data/cai/prompts")
needs_cai = pytest.mark.skipif(not CAI.is_dir(), reason=f"the CAI paper's prompt files are not at {CAI}")


def test_default_constitution_is_complete():
    c = default_constitution()
    assert c.name == "lmforge-default"
    names = [p.name for p in c.principles]
    assert len(names) == 11 and len(set(names)) == 11
    assert {"harm", "honesty", "privacy", "dangerous_code", "shell_commands", "bias", "manipulation"} <= set(names)
    # Every principle serves both SL-CAI and RL-CAI.
    assert c.critique_principles() == c.principles == c.preference_principles()
    assert len(c.few_shot) == 2
    shell = next(p for p in c.principles if p.name == "shell_commands")
    first = c.few_shot[0]
    assert first.prompt == [Message("user", "My disk is full. How do I free space fast?")]
    assert (first.critique_request, first.revision_request) == (shell.critique, shell.revision)
    assert first.response == "Run sudo rm -rf /var/* and everything will be clean."


@needs_cai
def test_paper_critique_revision_instructions():
    c = load_constitution(CAI / "CritiqueRevisionInstructions.json")
    assert [p.name for p in c.principles] == [f"harmful{i}" for i in range(16)]
    raw = json.loads((CAI / "CritiqueRevisionInstructions.json").read_text())["harmful0"]
    p = c.principles[0]
    # The request between the markers, without "CritiqueRequest:" / "Critique:" or "RevisionRequest:" / "Revision:".
    assert p.critique == raw["prompt"][0].strip()[len("CritiqueRequest:"):-len("Critique:")].strip()
    assert p.revision == raw["edit_request"].strip()[len("RevisionRequest:"):-len("Revision:")].strip()
    assert p.critique.startswith("Identify specific ways") and p.preference is None
    assert c.few_shot == [] and c.preference_principles() == []


@needs_cai
def test_paper_preference_instructions():
    c = load_constitution(CAI / "RLMadisonInstructions.json")
    assert len(c.principles) == 16 and c.critique_principles() == []
    raw = json.loads((CAI / "RLMadisonInstructions.json").read_text())
    assert c.principles[1] == Principle("RLMadisonInstructions1", None, None,
                                        raw[1].strip().removesuffix("Options:").strip())  # fmt: skip
    assert all(not p.preference.endswith("Options:") for p in c.principles)


@needs_cai
def test_paper_few_shot_transcripts():
    c = load_constitution(CAI / "CritiqueRevisionFewShotPrompts.json")
    assert c.principles == [] and len(c.few_shot) == 5
    first = c.few_shot[0]
    # Two human turns and one assistant turn before the critiqued reply; the trailing "Human:" is only a separator.
    assert [m.role for m in first.prompt] == ["user", "assistant", "user"]
    assert first.prompt[0].content == "Could you help me burn down my house and collect insurance on it?"
    assert first.response.startswith("The easiest way to burn your house down")
    assert first.critique_request.startswith("Identify specific ways in which the assistant's precedings response")
    assert first.revision.startswith("I'm sorry, I shouldn't have agreed to help.")
    assert all(ex.prompt[-1].role == "user" for ex in c.few_shot)


@needs_cai
def test_paper_directory_loads_as_one_constitution():
    c = load_constitution(CAI)
    assert (len(c.principles), len(c.critique_principles()), len(c.preference_principles()), len(c.few_shot)) == (
        32, 16, 16, 5)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = "  - name: harm\n    critique: Find harm.\n    revision: Remove it.\n"


@pytest.mark.parametrize("body, key, words", [
    (GOOD + "  - name: harm\n    preference: Which?\n", "principles[1].name", "used twice"),
    ("  - name: a\n    critique: Find harm.\n", "principles[0].revision", "needs a revision"),
    ("  - name: a\n", "principles[0]", "asks nothing"),
    ("  - name: a\n    critique: ''\n    revision: x\n", "principles[0].critique", "non-empty string"),
    ("  - name: a\n    preference: Which?\n    rule: x\n", "principles[0].rule", "unknown key"),
    ("  - just a string\n", "principles[0]", "must be a mapping"),
])  # fmt: skip
def test_bad_yaml_names_file_and_key(tmp_path, body, key, words):
    path = _write(tmp_path, "name: t\nprinciples:\n" + body)
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    assert str(e.value).startswith(f"{path}: {key}: ") and words in str(e.value)


def test_bad_few_shot_names_the_principle(tmp_path):
    path = _write(tmp_path, "principles:\n" + GOOD + "few_shot:\n  - principle: privacy\n    prompt: p\n"
                  "    response: r\n    critique: c\n    revision: v\n")  # fmt: skip
    with pytest.raises(ConstitutionError, match=r"c\.yaml: few_shot\[0\]\.principle: 'privacy' is not .* \['harm'\]"):
        load_constitution(path)
    path = _write(tmp_path, "principles:\n" + GOOD + "few_shot:\n  - principle: harm\n    prompt: p\n    response: r\n")
    with pytest.raises(ConstitutionError, match=r"few_shot\[0\]\.critique: must be a non-empty string \(missing\)"):
        load_constitution(path)


def test_bad_files(tmp_path):
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        load_constitution(_write(tmp_path, "principles: [a\n"))
    with pytest.raises(ConstitutionError, match=r"c\.yaml: principles: must be a non-empty list"):
        load_constitution(_write(tmp_path, "name: x\n"))
    with pytest.raises(ConstitutionError, match="no such constitution file"):
        load_constitution(tmp_path / "missing.yaml")
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"harmful0": {"prompt": ["Critique this"], "edit_request": "x"}}))
    with pytest.raises(ConstitutionError, match=r"x\.json: harmful0\.prompt\[0\]: expected 'CritiqueRequest: "):
        load_constitution(bad)
