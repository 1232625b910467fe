import json
import re
from pathlib import Path

import pytest

from lmforge.data.decontam import Decontaminator
from lmforge.data.base_reader import Document
from lmforge.data.readers import stdlib_root

EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
ARC = EVAL / "mc" / "arc_challenge.jsonl"
COPA = EVAL / "mc" / "copa.jsonl"
needs_eval = pytest.mark.skipif(
    not (ARC.exists() and COPA.exists()), reason=f"real eval sets not found under {EVAL} (the shared data folder)"
)

# Our own sentences, written for these tests: 14 and 9 words.
LONG = "the lighthouse keeper counted every passing ship in a worn notebook for forty years"
SHORT = "a quiet harbour town wakes before the fishing boats"


def _doc(text: str, doc_id: str = "d") -> Document:
    return Document(id=doc_id, text=text, source="test", meta={"lang": "en"})


def _words(text: str) -> list[str]:
    return re.sub(r"[\W_]+", " ", text.lower()).split()


def _first_long_arc_question() -> str:
    with open(ARC, encoding="utf-8") as f:
        for line in f:
            query = json.loads(line)["query"]
            if len(_words(query)) >= 20:
                return query
    raise AssertionError("no ARC question of 20 words")


@pytest.fixture(scope="module")
def real_eval() -> Decontaminator:
    return Decontaminator([ARC, COPA])


@needs_eval
def test_document_containing_a_real_benchmark_question_is_dropped(real_eval):
    question = _first_long_arc_question()
    text = (stdlib_root() / "textwrap.py").read_text(encoding="utf-8")
    contaminated = text + "\n# " + question.upper() + "\n" + text
    assert real_eval.apply(_doc(contaminated)) == "contaminated"


@needs_eval
def test_unrelated_stdlib_files_are_kept(real_eval):
    for name in ("textwrap.py", "json/decoder.py", "shlex.py"):
        doc = _doc((stdlib_root() / name).read_text(encoding="utf-8"))
        assert real_eval.apply(doc) is doc


@needs_eval
def test_flag_mode_counts_grams_and_names_eval_files_exactly():
    flagger = Decontaminator([ARC, COPA], mode="flag")
    question = _first_long_arc_question()
    text = (stdlib_root() / "bisect.py").read_text(encoding="utf-8")
    out = flagger.apply(_doc(text + "\n" + question + "\n" + text))
    words = _words(question)
    expected = len({tuple(words[i : i + 13]) for i in range(len(words) - 12)})
    assert out.meta == {"lang": "en", "contamination": {"ngrams": expected, "eval_files": ["arc_challenge.jsonl"]}}
    assert out.text.startswith(text)


def _write_eval(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "evalset.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_n_is_configurable(tmp_path):
    path = _write_eval(tmp_path, [{"question": LONG, "answer": "yes"}])
    shared_run = "in his log: every passing ship in a worn notebook!"
    assert Decontaminator([path]).apply(_doc(shared_run)).id == "d"
    assert Decontaminator([path], n=5).apply(_doc(shared_run)) == "contaminated"
    # The shared run "every passing ship in a worn notebook" holds exactly 3 5-grams.
    assert Decontaminator([path], n=5, min_overlaps=3).apply(_doc(shared_run)) == "contaminated"
    assert Decontaminator([path], n=5, min_overlaps=4).apply(_doc(shared_run)).id == "d"


def test_short_eval_texts_count_whole_and_tiny_ones_are_ignored(tmp_path):
    path = _write_eval(tmp_path, [{"context": SHORT, "continuation": "boats"}])
    decon = Decontaminator([path])
    assert decon.short_lengths == {9}
    assert decon.apply(_doc("Every day " + SHORT.title() + ", they say.")) == "contaminated"
    assert decon.apply(_doc("a quiet harbour town wakes before the boats")).id == "d"
    assert decon.apply(_doc("the boats came in")).id == "d"  # a one-word answer indexes nothing
    assert Decontaminator([path], min_short_words=10).num_grams == 0


def test_json_files_nested_strings_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "set.json").write_text(
        json.dumps([{"id": 3, "choices": [["x", LONG]], "gold": 0}]), encoding="utf-8"
    )
    flagger = Decontaminator([tmp_path], mode="flag")  # LONG has 14 words: two 13-grams
    assert flagger.files == ["sub/set.json"]
    out = flagger.apply(_doc("Log: " + LONG + "."))
    assert out.meta["contamination"] == {"ngrams": 2, "eval_files": ["sub/set.json"]}


def test_bad_settings_and_files_are_loud(tmp_path):
    path = _write_eval(tmp_path, [{"q": LONG}])
    with pytest.raises(ValueError, match="mode"):
        Decontaminator([path], mode="remove")
    with pytest.raises(FileNotFoundError):
        Decontaminator([tmp_path / "missing.jsonl"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"q": LONG}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        Decontaminator([broken])
