"""Deduplication (lmforge.data.dedup): one Deduplicator, streamed here and run by the curate stage's decide step."""

import hashlib
import json
import random
import re

import pytest

from lmforge.data.base_reader import Document
from lmforge.data.config import DataConfig
from lmforge.data.curate import run_curate
from lmforge.data.curated import iter_split_records
from lmforge.data.dedup import DedupKeys, Deduplicator, content_digest
from lmforge.data.minhash import MinHashDedup
from lmforge.data.readers import stdlib_root


def _doc(text: str, doc_id: str = "d") -> Document:
    return Document(id=doc_id, text=text, source="test")


def _real(name: str) -> str:
    return (stdlib_root() / name).read_text(encoding="utf-8")


def _edited(text: str, fraction: float = 0.01, seed: int = 0) -> str:
    """`text` with `fraction` of its words replaced by made-up ones: a near duplicate, not an exact one."""
    parts = re.split(r"(\s+)", text)  # words at even positions, the whitespace between them (lines kept) at odd
    words = range(0, len(parts), 2)
    for pos in random.Random(seed).sample(words, max(1, int(len(words) * fraction))):
        parts[pos] = f"qzx{pos}"
    return "".join(parts)


def test_content_digest_is_sha1_of_the_text_with_whitespace_collapsed():
    assert content_digest("def  f():\n\treturn 1\n") == hashlib.sha1(b"def f(): return 1").digest()
    assert content_digest("a b") != content_digest("ab")


def test_exact_dedup_keeps_first_and_ignores_whitespace_layout():
    f = Deduplicator(exact=True)
    assert f.apply(_doc("def f():\n    return 1\n", "a")).id == "a"
    assert f.apply(_doc("def  f():\n\treturn 1", "b")) == "duplicate"
    assert f.apply(_doc("def f():\n    return 2\n", "c")).id == "c"
    assert f.apply(_doc("def f():\n    return 1\n", "d")) == "duplicate"
    assert Deduplicator(exact=False).apply(_doc("def f():\n    return 1\n", "e")).id == "e"  # nothing to check


def test_a_text_is_remembered_by_each_check_it_passes_whatever_later_checks_decide():
    original, edited = _real("textwrap.py"), _edited(_real("textwrap.py"))
    both = Deduplicator(exact=True, near=MinHashDedup())
    assert both.apply(_doc(original, "a")).id == "a"
    # `edited` passes the exact check (its digest is new and now remembered), then the near check drops it ...
    assert both.apply(_doc(edited, "b")) == "near duplicate"
    # ... so its copy is an exact duplicate, caught before the near check.
    assert both.apply(_doc(edited, "c")) == "duplicate"
    assert both.near.kept == 1  # dropped documents are not indexed
    near_only = Deduplicator(exact=False, near=MinHashDedup())
    assert [near_only.apply(_doc(t, i)) for t, i in [(original, "a"), (edited, "b"), (edited, "c")]][1:] == \
        ["near duplicate", "near duplicate"]  # fmt: skip


def test_from_config_follows_the_data_settings():
    assert Deduplicator.from_config(DataConfig()).exact and Deduplicator.from_config(DataConfig()).near is None
    cfg = DataConfig(dedup=False, near_dedup=True, near_dedup_threshold=0.7, minhash_bands=10, minhash_rows=4,
                     shingle_words=3)  # fmt: skip
    dedup = Deduplicator.from_config(cfg)
    assert not dedup.exact
    assert (dedup.near.threshold, dedup.near.bands, dedup.near.rows, dedup.near.n) == (0.7, 10, 4, 3)
    keys = dedup.keys(_real("bisect.py"))
    assert keys.digest == content_digest(_real("bisect.py")) and keys.signature.shape == (40,) and len(keys.bands) == 10


def test_near_check_without_a_signature_names_the_fix():
    with pytest.raises(ValueError, match="signature and band keys"):
        Deduplicator(exact=False, near=MinHashDedup()).check(DedupKeys(content_digest("x")))


def _corpus(root):
    """Files in input (path) order: originals, an exact copy, a near copy, and an exact copy of the near copy."""
    texts = {"00_textwrap.py": _real("textwrap.py"), "01_bisect.py": _real("bisect.py"),
             "02_shlex.py": _real("shlex.py"), "03_bisect_copy.py": "  " + _real("bisect.py").replace("\n", "\n\n"),
             "04_textwrap_edit.py": _edited(_real("textwrap.py"), seed=1),
             "05_textwrap_edit_copy.py": _edited(_real("textwrap.py"), seed=1),
             "06_colorsys.py": _real("colorsys.py"), "07_shlex_edit.py": _edited(_real("shlex.py"), seed=2)}  # fmt: skip
    root.mkdir()
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    return texts


@pytest.mark.parametrize("exact, near, max_docs", [(True, True, None), (True, False, None), (False, True, None),
                                                   (True, True, 2)])  # fmt: skip
def test_curate_stage_decides_exactly_as_a_streamed_deduplicator(tmp_path, exact, near, max_docs):
    texts = _corpus(tmp_path / "src")
    # Small shards: the documents are signed in parallel tasks and decided across shard boundaries.
    cfg = DataConfig(source=str(tmp_path / "src"), shard_bytes=20_000, dedup=exact, near_dedup=near,
                     max_docs=max_docs, val_fraction=0.3, plots=False, workers=1, extensions=[".py"])  # fmt: skip
    run_curate(cfg, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    curated = sorted(r["id"] for s in ("train", "val") for r in iter_split_records(tmp_path / "out", s))
    stream = Deduplicator.from_config(cfg)
    kept, removed = [], {}
    for doc_id, text in texts.items():
        result = stream.apply(_doc(text, doc_id))
        if isinstance(result, str):
            reason = result
        elif max_docs is not None and len(kept) >= max_docs:
            reason = "over max_docs"
        else:
            kept.append(doc_id)
            continue
        removed[reason] = removed.get(reason, 0) + 1
    assert curated == kept
    assert {r: e["docs"] for r, e in stats["removed"].items()} == removed
    if exact and near and max_docs is None:  # the case spelled out: the copy of a near copy is an exact duplicate
        assert kept == ["00_textwrap.py", "01_bisect.py", "02_shlex.py", "06_colorsys.py"]
        assert removed == {"duplicate": 2, "near duplicate": 2}
    if max_docs == 2:  # a document over the cap passed the dedup checks, so its later copy is still a duplicate
        assert removed == {"over max_docs": 2, "duplicate": 2, "near duplicate": 2}
