import json
import sysconfig
from pathlib import Path

import pytest

from lmforge.data.base_reader import Document
from lmforge.data.toxicity import ToxicityFilter, default_word_list, load_word_list

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LDNOOBW_EN = DATA / "ldnoobw" / "en"
C4_DEMO = DATA / "web" / "cc_text" / "llamafactory_c4_demo.jsonl"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_MODULES = ("argparse.py", "typing.py", "subprocess.py", "pathlib.py", "json/decoder.py", "email/message.py")


def _doc(text: str) -> Document:
    return Document(id="t", text=text, source="test")


@pytest.fixture(scope="module")
def flt() -> ToxicityFilter:
    return ToxicityFilter()


@pytest.fixture(scope="module")
def bad_word(flt: ToxicityFilter) -> str:
    """An offensive word taken from the loaded lexicon, so none is spelled in this file; one with an "s" and an
    "i" so the leetspeak tests have substitutions to make."""
    words = sorted(w for w in flt._singles if w.isalpha() and len(w) >= 4 and "s" in w and "i" in w)
    assert words, "default list has no suitable word"
    return words[0]


def _filler(n: int) -> str:
    return " ".join(f"plain{i}" for i in range(n))


def _matches(flt: ToxicityFilter, text: str) -> int:
    return flt.count_matches(flt.tokens(text))


def test_case_insensitive_match(flt: ToxicityFilter, bad_word: str) -> None:
    assert _matches(flt, f"well {bad_word.upper()} then") == 1
    assert _matches(flt, f"well {bad_word.capitalize()}, then") == 1


def test_leetspeak_match(flt: ToxicityFilter, bad_word: str) -> None:
    leet = bad_word.replace("s", "$").replace("i", "1")
    assert leet != bad_word
    assert _matches(flt, f"so {leet} here") == 1
    assert _matches(flt, f"so {'.'.join(bad_word)} here") == 1
    assert _matches(flt, f"so {'-'.join(bad_word)} here") == 1
    plain = ToxicityFilter(leetspeak=False)
    assert plain.count_matches(plain.tokens(leet)) == 0


def test_word_boundary_no_scunthorpe(flt: ToxicityFilter, bad_word: str) -> None:
    assert _matches(flt, f"x{bad_word}y and {bad_word}ness and pre{bad_word}") == 0
    assert _matches(flt, f"snake_{bad_word}_case") == 1  # "_" separates words, as in identifiers


def test_numbers_and_hex_not_mangled(flt: ToxicityFilter) -> None:
    # Each would become a word of the default list if digits were always substituted.
    assert flt.tokens("a55 0xa55 $4.05 1337 3.14") == ["a55", "0xa55", "$4", "05", "1337", "3", "14"]


def test_phrase_match_counts_once(tmp_path: Path, bad_word: str) -> None:
    path = tmp_path / "words.txt"
    path.write_text(f"# comment\n\nred {bad_word} zone\n{bad_word}\n", encoding="utf-8")
    f = ToxicityFilter([path])
    assert f.count_matches(f.tokens(f"the red {bad_word} zone")) == 1
    assert f.count_matches(f.tokens(f"the red-{bad_word.upper()}-zone")) == 1
    assert f.count_matches(f.tokens(f"the {bad_word} zone")) == 1


def test_ratio_threshold_boundary(flt: ToxicityFilter, bad_word: str) -> None:
    at = flt.apply(_doc(f"{bad_word} {_filler(99)}"))  # 1 of 100 words: exactly max_ratio, kept
    assert isinstance(at, Document)
    assert at.meta["toxicity"] == {"matches": 1, "ratio": 0.01}
    assert flt.apply(_doc(f"{bad_word} {_filler(98)}")) == "toxicity: ratio"


def test_count_threshold(bad_word: str) -> None:
    f = ToxicityFilter(max_ratio=1.0, max_count=1)
    assert isinstance(f.apply(_doc(f"{bad_word} {_filler(5)}")), Document)
    assert f.apply(_doc(f"{bad_word} {bad_word} {_filler(5)}")) == "toxicity: count"


def test_clean_doc_keeps_meta(flt: ToxicityFilter) -> None:
    doc = Document(id="t", text="A quiet afternoon by the river.", source="test", meta={"lang": "en"})
    kept = flt.apply(doc)
    assert isinstance(kept, Document)
    assert kept.meta == {"lang": "en", "toxicity": {"matches": 0, "ratio": 0.0}}
    assert doc.meta == {"lang": "en"}


def test_user_list_from_tmp_file(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("# my list\nzorblax\n\nQuux Frob\n", encoding="utf-8")
    assert load_word_list(path) == {"zorblax", "quux frob"}
    f = ToxicityFilter([path], max_ratio=0.0)
    assert f.apply(_doc("one Zorblax here")) == "toxicity: ratio"
    assert f.apply(_doc("quux and frob apart")) != "toxicity: ratio"


def test_load_word_list_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_word_list(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no words"):
        load_word_list(empty)
    with pytest.raises(ValueError, match="max_ratio"):
        ToxicityFilter(max_ratio=2.0)


def test_default_list_read_from_package() -> None:
    assert len(default_word_list()) > 500


def test_ldnoobw_list_loads() -> None:
    if not LDNOOBW_EN.exists():
        pytest.skip(f"LDNOOBW list not found at {LDNOOBW_EN} (shared data not checked out)")
    words = load_word_list(LDNOOBW_EN)
    assert len(words) > 300
    assert any(" " in w for w in words)  # phrases survive loading
    f = ToxicityFilter([LDNOOBW_EN], allow=())
    word = sorted(w for w in words if w.isalpha() and len(w) >= 4)[0]
    assert f.count_matches(f.tokens(f"an {word.title()} here")) == 1


def test_no_false_positives_on_stdlib(flt: ToxicityFilter) -> None:
    for name in STDLIB_MODULES:
        path = STDLIB / name
        if not path.exists():
            pytest.skip(f"stdlib module {path} not found")
        result = flt.apply(Document(id=name, text=path.read_text(encoding="utf-8"), source="stdlib"))
        assert isinstance(result, Document), f"{name} dropped: {result}"


def test_no_false_positives_on_english(flt: ToxicityFilter) -> None:
    text = (
        "Scunthorpe United drew with Middlesex. The class assessment passed; analysts assumed the "
        "cocktail party in Essex was a success. Sussex grapes and Shiitake mushrooms cost $4.05, "
        "version 3.11.5 shipped on 2024-01-05. The mass of 1337 items, hex 0xa55, see e.g. the U.S.A. report!"
    )
    result = flt.apply(_doc(text))
    assert isinstance(result, Document)
    assert result.meta["toxicity"]["matches"] == 0


def test_c4_demo_mostly_kept(flt: ToxicityFilter) -> None:
    if not C4_DEMO.exists():
        pytest.skip(f"C4 demo not found at {C4_DEMO}")
    with C4_DEMO.open(encoding="utf-8") as fh:
        docs = [_doc(json.loads(line)["text"]) for line in fh]
    kept = sum(isinstance(flt.apply(d), Document) for d in docs)
    assert kept / len(docs) >= 0.97
