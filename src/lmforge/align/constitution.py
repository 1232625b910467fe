"""Constitutions: the written principles that drive constitutional AI (critique, revision and AI preference labels).

A `Principle` carries up to three requests: `critique` (asks the model to find what is wrong with its last reply
under the principle), `revision` (asks it to rewrite the reply to fix that) and `preference` (the question a judge
answers to pick the better of two replies). SL-CAI needs critique and revision; RL-CAI needs preference.
A `Constitution` is a list of principles and few-shot `Example`s of one critique -> revision exchange.

Two file formats are read by `load_constitution`:

- lmforge's YAML (the shipped default is `constitutions/default.yaml`):

  ```yaml
  name: my-constitution
  principles:
    - name: harm                  # unique
      critique: Point out ...     # critique and revision come together
      revision: Rewrite ...
      preference: Which reply ... # optional; a principle may also have only a preference
  few_shot:                       # optional
    - principle: harm             # whose critique and revision requests the example shows
      prompt: How do I ...        # the user's message
      response: ...               # the reply being critiqued
      critique: ...               # the critique the model should write
      revision: ...               # the revised reply
  ```

- the files the Constitutional AI paper published (Bai et al. 2022): `CritiqueRevisionInstructions.json` (an object
  of {name: {"prompt": ["...CritiqueRequest: ...Critique:"], "edit_request": "...RevisionRequest: ...Revision:"}}:
  critique principles), the few-shot file (an array of "Human: ... Assistant: ... CritiqueRequest: ... Critique:
  ... RevisionRequest: ... Revision: ..." transcripts: examples) and `RLMadisonInstructions.json` (an array of
  preference questions: preference principles), told apart by their shape. A directory holding those files loads
  as one constitution.

Every error names the file and the key (principles[3].revision) and says what to write instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmforge.finetune.data import Conversation, Message

DEFAULT = "default.yaml"
# The paper's transcript markers, and its file names (a directory of them loads as one constitution).
_MARK = re.compile(r"\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")
PAPER_FILES = ("CritiqueRevisionInstructions.json", "CritiqueRevisionFewShotPrompts.json", "RLMadisonInstructions.json")
_PREFERENCE_TAIL = "Options:"  # the paper's questions end by introducing the options; a judge shows its own


class ConstitutionError(ValueError):
    """A constitution file that cannot be used: names the file, the key and what to do."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str | None
    revision: str | None
    preference: str | None = None


@dataclass(frozen=True)
class Example:
    """One few-shot critique -> revision exchange: `prompt` (ending with the user's turn), the reply `response`,
    the critique request and the critique, the revision request and the revision."""

    prompt: Conversation
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: list[Principle]
    few_shot: list[Example] = field(default_factory=list)

    def critique_principles(self) -> list[Principle]:
        """The principles SL-CAI can draw: those with a critique and a revision request."""
        return [p for p in self.principles if p.critique and p.revision]

    def preference_principles(self) -> list[Principle]:
        """The principles RL-CAI can draw: those with a preference question."""
        return [p for p in self.principles if p.preference]


def _fail(path: Path, key: str, problem: str) -> ConstitutionError:
    return ConstitutionError(f"{path}: {key}: {problem}")


def _text(raw: dict[str, Any], key: str, path: Path, where: str, *, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in raw else f"got {value!r}"
        raise _fail(path, f"{where}.{key}", f"must be a non-empty string ({got})")
    return value.strip()


def _yaml_principle(raw: Any, path: Path, where: str) -> Principle:
    if not isinstance(raw, dict):
        raise _fail(path, where, f"must be a mapping with name, critique, revision, preference; got {raw!r}")
    unknown = sorted(set(raw) - {"name", "critique", "revision", "preference"})
    if unknown:
        raise _fail(path, f"{where}.{unknown[0]}", "unknown key; a principle has name, critique, revision, preference")
    name = _text(raw, "name", path, where)
    critique, revision = (_text(raw, k, path, where, required=False) for k in ("critique", "revision"))
    preference = _text(raw, "preference", path, where, required=False)
    if (critique is None) != (revision is None):
        missing = "revision" if revision is None else "critique"
        raise _fail(path, f"{where}.{missing}", "missing: a principle with a critique request needs a revision "
                    "request too (and the other way round)")  # fmt: skip
    if critique is None and preference is None:
        raise _fail(path, where, f"principle {name!r} asks nothing: give critique and revision, or preference")
    return Principle(name, critique, revision, preference)  # type: ignore[arg-type]


def _yaml_example(raw: Any, path: Path, where: str, principles: dict[str, Principle]) -> Example:
    if not isinstance(raw, dict):
        raise _fail(path, where, f"must be a mapping with principle, prompt, response, critique, revision; got {raw!r}")
    name = _text(raw, "principle", path, where)
    principle = principles.get(name)  # type: ignore[arg-type]
    if principle is None or not principle.critique:
        raise _fail(path, f"{where}.principle", f"{name!r} is not a principle with a critique request; known: "
                    f"{[p.name for p in principles.values() if p.critique]}")  # fmt: skip
    prompt, response, critique, revision = (_text(raw, k, path, where) for k in ("prompt", "response", "critique",
                                                                                  "revision"))  # fmt: skip
    return Example([Message("user", prompt)], response, principle.critique, critique,  # type: ignore[arg-type]
                   principle.revision, revision)  # type: ignore[arg-type]


def _from_yaml(path: Path) -> Constitution:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConstitutionError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConstitutionError(f"{path}: a constitution is a mapping with name, principles and few_shot keys")
    unknown = sorted(set(raw) - {"name", "principles", "few_shot"})
    if unknown:
        raise _fail(path, unknown[0], "unknown key; a constitution has name, principles and few_shot")
    items = raw.get("principles")
    if not isinstance(items, list) or not items:
        raise _fail(path, "principles", "must be a non-empty list of principles")
    principles: dict[str, Principle] = {}
    for i, item in enumerate(items):
        p = _yaml_principle(item, path, f"principles[{i}]")
        if p.name in principles:
            raise _fail(path, f"principles[{i}].name", f"{p.name!r} is used twice; principle names must be unique")
        principles[p.name] = p
    shots = raw.get("few_shot") or []
    if not isinstance(shots, list):
        raise _fail(path, "few_shot", "must be a list of examples")
    examples = [_yaml_example(s, path, f"few_shot[{i}]", principles) for i, s in enumerate(shots)]
    name = raw.get("name", path.stem)
    if not isinstance(name, str):
        raise _fail(path, "name", f"must be a string, got {name!r}")
    return Constitution(name, list(principles.values()), examples)


def _between(text: str, head: str, tail: str, path: Path, key: str) -> str:
    """The request inside one of the paper's "\\n\\nHead: ... \\n\\nTail:" strings."""
    body = text.strip()
    if not (body.startswith(head + ":") and body.endswith(tail + ":")):
        raise _fail(path, key, f"expected '{head}: ... {tail}:', got {text[:60]!r}")
    return body[len(head) + 1 : -len(tail) - 1].strip()


def _paper_principles(raw: dict[str, Any], path: Path) -> list[Principle]:
    out = []
    for name, item in raw.items():
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), list) and item["prompt"]
                and isinstance(item["prompt"][0], str) and isinstance(item.get("edit_request"), str)):  # fmt: skip
            raise _fail(path, name, "expected {\"prompt\": [\"CritiqueRequest: ...\"], \"edit_request\": \"...\"}")
        critique = _between(item["prompt"][0], "CritiqueRequest", "Critique", path, f"{name}.prompt[0]")
        revision = _between(item["edit_request"], "RevisionRequest", "Revision", path, f"{name}.edit_request")
        out.append(Principle(name, critique, revision))
    return out


def paper_example(transcript: str, path: Path, key: str) -> Example:
    """One of the paper's few-shot transcripts as an Example: the dialogue up to its last assistant turn is the
    prompt and the reply, then the critique request, critique, revision request and revision."""
    parts = _MARK.split(transcript)
    turns = [(role, text.strip()) for role, text in zip(parts[1::2], parts[2::2]) if text.strip()]
    roles = [role for role, _ in turns]
    tail = ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]
    if parts[0].strip() or roles[-4:] != tail or len(roles) < 6 or roles[-6:-4] != ["Human", "Assistant"]:
        raise _fail(path, key, f"expected Human/Assistant turns then {', '.join(tail)}; found {roles}")
    if any(role not in ("Human", "Assistant") for role in roles[:-4]):
        raise _fail(path, key, f"only Human/Assistant turns may come before the critique; found {roles}")
    dialogue = [Message("user" if role == "Human" else "assistant", text) for role, text in turns[:-5]]
    (_, response), *steps = turns[-5:]
    return Example(dialogue, response, *(text for _, text in steps))


def _from_json(path: Path) -> Constitution:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConstitutionError(f"{path}: not valid JSON ({e})") from e
    name = path.stem
    if isinstance(raw, dict):
        return Constitution(name, _paper_principles(raw, path))
    if isinstance(raw, list) and raw and all(isinstance(s, str) for s in raw):
        if all("CritiqueRequest:" in s for s in raw):
            return Constitution(name, [], [paper_example(s, path, f"[{i}]") for i, s in enumerate(raw)])
        questions = [s.strip().removesuffix(_PREFERENCE_TAIL).strip() for s in raw]
        return Constitution(name, [Principle(f"{name}{i}", None, None, q) for i, q in enumerate(questions)])
    raise ConstitutionError(f"{path}: not a constitution: expected the paper's critique/revision object, few-shot "
                            "transcripts or preference questions (a list of strings), or lmforge's YAML")  # fmt: skip


def _from_dir(path: Path) -> Constitution:
    found = [path / f for f in PAPER_FILES if (path / f).is_file()]
    if not found:
        raise ConstitutionError(f"{path}: a directory must hold the paper's files ({', '.join(PAPER_FILES)})")
    parts = [_from_json(f) for f in found]
    return Constitution(path.name, [p for c in parts for p in c.principles], [e for c in parts for e in c.few_shot])


def load_constitution(path: str | Path) -> Constitution:
    """A constitution from lmforge's YAML, one of the paper's JSON files, or a directory of them."""
    path = Path(path)
    if path.is_dir():
        return _from_dir(path)
    if not path.is_file():
        raise ConstitutionError(f"{path}: no such constitution file (give a .yaml, one of the paper's .json files, "
                                "or a directory of them)")  # fmt: skip
    if path.suffix == ".json":
        return _from_json(path)
    return _from_yaml(path)


def default_constitution() -> Constitution:
    """The constitution lmforge ships (src/lmforge/align/constitutions/default.yaml)."""
    with resources.as_file(resources.files("lmforge.align") / "constitutions" / DEFAULT) as path:
        return load_constitution(path)
