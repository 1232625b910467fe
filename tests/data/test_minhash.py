import os
import random
import subprocess
import sys

import numpy as np
import pytest

from lmforge.data.minhash import (
    MinHashDedup,
    exact_jaccard,
    jaccard_estimate,
    normalized_words,
    shingles,
)
from lmforge.data.base_reader import Document
from lmforge.data.readers import stdlib_root

# Real, unrelated standard-library modules of a few hundred to a few thousand words each.
REAL_FILES = ("textwrap.py", "json/decoder.py", "colorsys.py", "bisect.py", "fnmatch.py", "shlex.py")


def _real(name: str) -> str:
    return (stdlib_root() / name).read_text(encoding="utf-8")


def _doc(doc_id: str, text: str) -> Document:
    return Document(id=doc_id, text=text, source="test")


def _replace_words(text: str, fraction: float, seed: int) -> str:
    """The text's words with `fraction` of them replaced by a word that occurs nowhere in Python source."""
    words = text.split()
    rng = random.Random(seed)
    for pos in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[pos] = f"qzx{pos}"
    return " ".join(words)


def test_normalized_words_lowercases_and_breaks_on_punctuation():
    assert normalized_words("Hello, World!  foo_bar(x)\n--Baz") == ["hello", "world", "foo", "bar", "x", "baz"]


def test_signature_is_uint64_of_num_perm_and_deterministic_across_processes():
    dedup = MinHashDedup()
    sig = dedup.signature(_real("textwrap.py"))
    assert sig.dtype == np.uint64 and sig.shape == (112,)
    assert (sig < (1 << 61) - 1).all()
    code = (
        "from lmforge.data.minhash import MinHashDedup; from lmforge.data.readers import stdlib_root;"
        "print(MinHashDedup().signature((stdlib_root() / 'textwrap.py').read_text(encoding='utf-8')).tolist())"
    )
    # A different hash seed in the child proves nothing depends on Python's per-process salted `hash`.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(sig.tolist())


def test_seed_changes_the_hash_family():
    text = _real("bisect.py")
    assert not np.array_equal(MinHashDedup(seed=0).signature(text), MinHashDedup(seed=1).signature(text))


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.03, 0.08])
def test_jaccard_estimate_is_close_to_exact_on_real_text(fraction):
    dedup = MinHashDedup()
    for name in REAL_FILES[:3]:
        original = _real(name)
        variant = _replace_words(original, fraction, seed=len(name))
        exact = exact_jaccard(shingles(original), shingles(variant))
        estimate = jaccard_estimate(dedup.signature(original), dedup.signature(variant))
        assert abs(estimate - exact) < 0.1, (name, fraction, exact, estimate)


def test_jaccard_estimate_of_unrelated_real_files_is_near_zero():
    dedup = MinHashDedup()
    sigs = [dedup.signature(_real(name)) for name in REAL_FILES]
    for i in range(len(sigs)):
        for j in range(i + 1, len(sigs)):
            assert jaccard_estimate(sigs[i], sigs[j]) < 0.1


def test_identical_and_lightly_edited_documents_are_dropped_unrelated_kept():
    dedup = MinHashDedup()
    original = _real("textwrap.py")
    assert dedup.apply(_doc("a", original)).id == "a"
    assert dedup.apply(_doc("a-copy", original)) == "near duplicate"
    # Reformatting and case do not change the normalised words.
    assert dedup.apply(_doc("a-upper", original.upper().replace("\n", "\n\n"))) == "near duplicate"
    assert dedup.apply(_doc("a-edit", _replace_words(original, 0.01, seed=1))) == "near duplicate"
    for name in REAL_FILES[1:]:
        assert dedup.apply(_doc(name, _real(name))).id == name
    assert dedup.kept == len(REAL_FILES)


def test_heavily_edited_document_is_kept():
    dedup = MinHashDedup()
    original = _real("shlex.py")
    dedup.apply(_doc("a", original))
    variant = _replace_words(original, 0.15, seed=2)
    assert exact_jaccard(shingles(original), shingles(variant)) < 0.5
    assert dedup.apply(_doc("b", variant)).id == "b"


def test_first_occurrence_in_stream_order_is_kept():
    original = _real("fnmatch.py")
    edited = _replace_words(original, 0.01, seed=3)
    for first, second in [(original, edited), (edited, original)]:
        dedup = MinHashDedup()
        results = [dedup.apply(_doc("first", first)), dedup.apply(_doc("second", second))]
        assert results[0].id == "first" and results[1] == "near duplicate"


def test_threshold_is_configurable():
    original = _real("colorsys.py")
    edited = _replace_words(original, 0.03, seed=4)
    strict = MinHashDedup(threshold=1.0)
    strict.apply(_doc("a", original))
    assert strict.apply(_doc("b", edited)).id == "b"
    assert strict.apply(_doc("c", original)) == "near duplicate"


def test_short_documents_fall_back_to_exact_word_match():
    dedup = MinHashDedup()
    assert dedup.apply(_doc("a", "Hello, world!")).id == "a"
    assert dedup.apply(_doc("b", "hello   WORLD")) == "near duplicate"
    assert dedup.apply(_doc("c", "hello there world")).id == "c"
    # A long document starting with the short one's words is not its duplicate, nor the other way round.
    assert dedup.apply(_doc("d", "hello world " + _real("bisect.py"))).id == "d"
    assert dedup.apply(_doc("e", "")).id == "e"
    assert dedup.apply(_doc("f", "  ...  ")) == "near duplicate"


def test_custom_shingle_length_and_band_layout():
    dedup = MinHashDedup(bands=10, rows=4, n=3)
    assert dedup.signature(_real("bisect.py")).shape == (40,)
    assert len(shingles("a b c d", n=3)) == 2


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 0.0}, {"threshold": 1.5}, {"bands": 0}, {"rows": 0}, {"n": 0}]
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        MinHashDedup(**kwargs)
