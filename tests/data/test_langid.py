"""LanguageFilter on real English web text, real non-English text from the stdlib tests, and a fake classifier."""

from __future__ import annotations

import ast
import sysconfig
import time
import tokenize
from pathlib import Path

import pytest

from lmforge.data import langid
from lmforge.data.langid import LanguageFilter, detect_language, text_sample
from lmforge.data.base_reader import Document
from lmforge.data.readers import read_documents

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STDLIB_TESTS = Path(sysconfig.get_paths()["stdlib"]) / "test"


def _shared(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"real data file {path} is absent (the shared data folder is only on CI and dev machines)")
    return path


def _stdlib_text(rel: str) -> str:
    """Natural-language text that CPython's own test suite keeps; skipped where a distro strips Lib/test."""
    path = STDLIB_TESTS / rel
    if not path.exists():
        pytest.skip(f"{path} is absent: this Python was installed without its test suite")
    if path.suffix == ".py":  # a module holding one string literal in a legacy encoding it declares
        with tokenize.open(path) as f:
            tree = ast.parse(f.read())
        return next(n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign))
    return path.read_text(encoding="utf-8")


def _doc(text: str, meta: dict | None = None) -> Document:
    return Document(id="t", text=text, source="test", meta=dict(meta or {}))


def test_c4_demo_is_kept_as_english() -> None:
    docs = list(read_documents(_shared("web/cc_text/llamafactory_c4_demo.jsonl")))
    flt = LanguageFilter()
    results = [flt.apply(d) for d in docs]
    kept = [r for r in results if isinstance(r, Document)]
    # Measured 295 of 300 (98.3%); the five drops are short product listings and names ("low confidence").
    assert len(docs) == 300
    assert len(kept) / len(docs) >= 0.96
    assert all(r == "language: low confidence" for r in results if isinstance(r, str))
    assert all(d.meta["language"] == "en" and d.meta["language_score"] >= 0.65 for d in kept)


def test_wiki_demo_paragraphs_are_all_english() -> None:
    text = _shared("web/wiki/llamafactory_wiki_demo.txt").read_text(encoding="utf-8")
    paragraphs = [line for line in text.splitlines() if line.strip()]
    flt = LanguageFilter()
    assert all(isinstance(flt.apply(_doc(p)), Document) for p in paragraphs)


@pytest.mark.parametrize(
    ("rel", "code"),
    [
        ("encoded_modules/module_iso_8859_1.py", "fr"),
        ("encoded_modules/module_koi8_r.py", "ru"),
        ("cjkencodings/euc_jp-utf8.txt", "ja"),
        ("cjkencodings/cp949-utf8.txt", "ko"),
        ("cjkencodings/gbk-utf8.txt", "zh"),
    ],
)
def test_real_non_english_text_is_identified_and_dropped(rel: str, code: str) -> None:
    text = _stdlib_text(rel)
    assert detect_language(text)[0] == code
    assert LanguageFilter().apply(_doc(text)) in {f"language: {code}", "language: low confidence"}
    kept = LanguageFilter(languages=(code,), min_confidence=0.5).apply(_doc(text))
    assert isinstance(kept, Document) and kept.meta["language"] == code


def test_several_allowed_languages() -> None:
    # Our own sentences, written for this test.
    german = "Der alte Bahnhof am Rand der Stadt wird im nächsten Frühjahr zu einer Bibliothek umgebaut."
    spanish = "Cada mañana mi vecina riega las plantas del balcón antes de salir hacia la universidad."
    flt = LanguageFilter(languages=["de", "es"])
    assert [flt.apply(_doc(t)).meta["language"] for t in (german, spanish)] == ["de", "es"]
    assert LanguageFilter().apply(_doc(german)) == "language: de"


def test_annotate_only_keeps_everything_and_leaves_input_alone() -> None:
    flt = LanguageFilter(languages=())
    french = _doc(_stdlib_text("encoded_modules/module_iso_8859_1.py"), meta={"url": "x"})
    out = flt.apply(french)
    assert isinstance(out, Document)
    assert out.meta == {"url": "x", "language": "fr", "language_score": pytest.approx(1.0, abs=1e-3)}
    assert french.meta == {"url": "x"}  # annotated on a copy
    blank = flt.apply(_doc(" \n\t "))  # no features at all: uniform probabilities, still kept
    assert isinstance(blank, Document) and blank.meta["language_score"] < 0.1


class _FakeIdentifier:
    """Stands in for py3langid so the threshold and the sample can be checked exactly."""

    labels = ["de", "en", "fr"]

    def __init__(self, answer: tuple[str, float]) -> None:
        self.answer = answer
        self.seen: list[str] = []

    def classify(self, text: str) -> tuple[str, float]:
        self.seen.append(text)
        return self.answer


def _with_fake(monkeypatch: pytest.MonkeyPatch, answer: tuple[str, float]) -> _FakeIdentifier:
    fake = _FakeIdentifier(answer)
    monkeypatch.setattr(langid, "_identifier", lambda: fake)
    return fake


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (("en", 0.65), None),  # exactly at the threshold is kept
        (("en", 0.6499), "language: low confidence"),
        (("de", 0.65), "language: de"),
        (("de", 0.3), "language: low confidence"),
    ],
)
def test_threshold_boundary(monkeypatch: pytest.MonkeyPatch, answer: tuple[str, float], expected: str | None) -> None:
    _with_fake(monkeypatch, answer)
    out = LanguageFilter(min_confidence=0.65).apply(_doc("anything"))
    if expected is None:
        assert isinstance(out, Document) and out.meta["language_score"] == 0.65
    else:
        assert out == expected


def test_classifier_sees_only_the_collapsed_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _with_fake(monkeypatch, ("en", 0.9))
    text = "\n\n   " * 2000 + "word  \t" * 1_000_000  # 5 MB+, opening with more whitespace than the sample
    LanguageFilter(sample_chars=100).apply(_doc(text))
    assert fake.seen == [("word " * 20)[:100]]


def test_text_sample_matches_collapsing_the_whole_text() -> None:
    for text in ["", "   ", "a  b\n\nc", " x" * 50, "\t" * 300 + "tail end", "abc" * 100]:
        for n in (1, 5, 64):
            assert text_sample(text, n) == " ".join(text.split())[:n]


def test_huge_document_costs_no_more_than_its_sample() -> None:
    text = _stdlib_text("encoded_modules/module_iso_8859_1.py")
    huge = _doc((text + "\n") * (5_000_000 // len(text)))
    flt = LanguageFilter()
    flt.apply(_doc(text))  # load the model before timing
    start = time.perf_counter()
    assert flt.apply(huge) == "language: fr"
    # Measured ~2 ms; classifying all 5 MB would take seconds (the byte walk runs at a few MB/s).
    assert time.perf_counter() - start < 0.2


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="xx"):
        LanguageFilter(languages=["en", "xx"])
    with pytest.raises(ValueError, match="min_confidence"):
        LanguageFilter(min_confidence=1.5)
    with pytest.raises(ValueError, match="sample_chars"):
        LanguageFilter(sample_chars=0)
    assert LanguageFilter(languages="en").languages == {"en"}
