"""The optional classic preprocessing steps: exact outputs, their place in curation and their counts in stats.json."""

import json

from lmforge.data.base_reader import Document
from lmforge.data.config import DataConfig
from lmforge.data.curate import run_curate
from lmforge.data.curated import iter_split_records
from lmforge.data.filters import build_filters
from lmforge.data.preprocess import Lowercase, SpellingCorrector, StopWordRemover, english_stop_words


def _doc(text: str) -> Document:
    return Document(id="a.txt", text=text, source="a.txt")


def test_lowercase_folds_every_script_and_keeps_everything_else():
    assert Lowercase().apply(_doc("The Café in ÜBER-Town, 42 Ways.")).text == "the café in über-town, 42 ways."
    same = _doc("already lower, 42.")
    assert Lowercase().apply(same) is same


def test_stop_words_go_with_the_spaces_after_them_and_punctuation_stays():
    text = "The cat sat on the mat, and it was\thappy.\nIs this the end?"
    assert StopWordRemover().apply(_doc(text)).text == "cat sat mat, happy.\nend?"
    assert {"the", "and", "is", "was"} <= english_stop_words() and "cat" not in english_stop_words()


def test_spelling_correction_fixes_misspellings_and_keeps_case_acronyms_and_short_words():
    text = "Teh quick brwon fox jumps over the lazzy dog in Londn. NASA ok, ab 42nd."
    fixed = SpellingCorrector().apply(_doc(text)).text
    assert fixed == "The quick brown fox jumps over the lazy dog in London. NASA ok, ab 42nd."
    correct = _doc("The quick brown fox jumps over the lazy dog.")
    assert SpellingCorrector().apply(correct) is correct


def test_defaults_add_no_preprocessing_and_the_options_run_last_in_order():
    names = [f.name for f in build_filters(DataConfig())]
    assert not {"spelling", "stop_words", "lowercase"} & set(names)
    on = [f.name for f in build_filters(DataConfig(lowercase=True, remove_stop_words=True, spell_correct=True,
                                                   pii=True))]  # fmt: skip
    assert on[-3:] == ["spelling", "stop_words", "lowercase"] and on.index("pii") < on.index("spelling")


def test_curate_counts_the_documents_each_step_changed_and_dedups_after_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = {"a.txt": "The Weather is fine today.", "b.txt": "the weather is fine today.",
             "c.txt": "weather fine today.", "d.txt": "Sunny skies over Londn."}  # fmt: skip
    for name, text in texts.items():
        (src / name).write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    cfg = DataConfig(source=str(src), workers=1, plots=False, min_chars=0, val_fraction=0.0, lowercase=True,
                     remove_stop_words=True, spell_correct=True)  # fmt: skip
    run_curate(cfg, out)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert {k: v["docs"] for k, v in stats["modified"].items()} == {"lowercase": 2, "spelling": 1, "stop_words": 3}
    # a, b and c are one text once normalised: the first is kept, the other two are exact duplicates.
    assert stats["removed"]["duplicate"]["docs"] == 2
    assert [(r["id"], r["text"]) for r in iter_split_records(out, "train")] == [
        ("a.txt", "weather fine today."), ("d.txt", "sunny skies london.")]
