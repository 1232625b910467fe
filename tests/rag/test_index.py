"""The on-disk index: build, reopen, incremental updates (kept / changed / added / removed), embeddings kept."""

import json
import os

import numpy as np

from lmforge.rag import Index, build_index
from lmforge.rag.index import CHUNKS, EMBEDDINGS, MANIFEST


def _folder(root):
    src = root / "docs"
    src.mkdir()
    (src / "a.md").write_text("# Alpha\n\nThe alpha particle is a helium nucleus.\n", encoding="utf-8")
    (src / "b.txt").write_text("Bananas are yellow.\n\nBananas grow in bunches.\n", encoding="utf-8")
    (src / "c.py").write_text("def gamma():\n    return 'gamma ray'\n", encoding="utf-8")
    return src


class CountingEmbedder:
    """Counts the texts it embeds; rows are a hash of the text, unit norm."""

    def __init__(self):
        self.seen = []

    def __call__(self, texts):
        self.seen += list(texts)
        rows = np.array([[hash(t) % 97 + 1, len(t) + 1] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_build_then_open_round_trips(tmp_path):
    src = _folder(tmp_path)
    stats = build_index(src, tmp_path / "idx")
    assert (stats.files, stats.added, stats.kept, stats.chunks) == (3, 3, 0, stats.new_chunks)
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    a = manifest["files"]["a.md"]
    assert a["size"] == (src / "a.md").stat().st_size and a["mtime_ns"] == (src / "a.md").stat().st_mtime_ns
    import hashlib
    assert a["sha256"] == hashlib.sha256((src / "a.md").read_bytes()).hexdigest()
    index = Index.open(tmp_path / "idx")
    hit = index.search("helium", k=1)[0]
    assert (hit.chunk.file, hit.chunk.heading, hit.chunk.start_line, hit.chunk.end_line) == ("a.md", "Alpha", 1, 3)
    assert index.search("gamma", k=1)[0].chunk.file == "c.py"
    assert not (tmp_path / "idx" / EMBEDDINGS).exists()


def test_incremental_update_rechunks_only_what_changed(tmp_path):
    src = _folder(tmp_path)
    out = tmp_path / "idx"
    build_index(src, out)
    before = {c["id"]: c for c in map(json.loads, (out / CHUNKS).read_text().splitlines())}
    # touched only (same content, new mtime): kept; edited: re-chunked; deleted: gone; new: added
    os.utime(src / "a.md", ns=((src / "a.md").stat().st_atime_ns, (src / "a.md").stat().st_mtime_ns + 10**9))
    (src / "b.txt").write_text("Bananas are yellow.\n\nPlantains are starchy.\n", encoding="utf-8")
    (src / "c.py").unlink()
    (src / "d.txt").write_text("Delta is a river mouth.\n", encoding="utf-8")
    stats = build_index(src, out)
    assert (stats.files, stats.kept, stats.changed, stats.added, stats.removed) == (3, 1, 1, 1, 1)
    assert stats.new_chunks == 2  # b.txt's one chunk and d.txt's
    after = {c["id"]: c for c in map(json.loads, (out / CHUNKS).read_text().splitlines())}
    assert after["a.md#0"] == before["a.md#0"]
    assert not any(c["file"] == "c.py" for c in after.values())
    assert "Plantains" in after["b.txt#0"]["text"]
    index = Index.open(out)
    assert index.search("gamma", k=3) == []
    assert index.search("plantains", k=1)[0].chunk.file == "b.txt"
    assert json.loads((out / MANIFEST).read_text())["files"]["a.md"]["mtime_ns"] == (src / "a.md").stat().st_mtime_ns
    unchanged = build_index(src, out)
    assert (unchanged.kept, unchanged.new_chunks) == (3, 0)


def test_embeddings_of_kept_files_are_reused(tmp_path):
    src = _folder(tmp_path)
    out = tmp_path / "idx"
    embed = CountingEmbedder()
    build_index(src, out, embedder=embed)
    first = np.load(out / EMBEDDINGS)
    assert len(first) == len((out / CHUNKS).read_text().splitlines()) == len(embed.seen)
    embed.seen.clear()
    (src / "d.txt").write_text("Delta is a river mouth.\n", encoding="utf-8")
    build_index(src, out, embedder=embed)
    assert embed.seen == ["Delta is a river mouth."]
    rows = np.load(out / EMBEDDINGS)
    chunks = [json.loads(line) for line in (out / CHUNKS).read_text().splitlines()]
    again = embed([c["heading"] + "\n" + c["text"] if c["heading"] else c["text"] for c in chunks])
    np.testing.assert_allclose(rows, again, rtol=1e-6)


def test_changed_settings_rebuild_everything(tmp_path):
    src = _folder(tmp_path)
    build_index(src, tmp_path / "idx")
    stats = build_index(src, tmp_path / "idx", chunk_tokens=50, overlap=10)
    assert (stats.kept, stats.added) == (0, 3)


def test_an_empty_folder_gives_an_empty_index_that_finds_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    stats = build_index(tmp_path / "empty", tmp_path / "idx")
    assert (stats.files, stats.chunks) == (0, 0)
    assert Index.open(tmp_path / "idx").search("anything", k=3, mode="bm25") == []


def test_a_failed_build_leaves_the_previous_index_whole(tmp_path):
    import pytest

    src = _folder(tmp_path)
    out = tmp_path / "idx"
    build_index(src, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (src / "d.txt").write_text("Delta is a river mouth.\n", encoding="utf-8")

    def broken(texts):
        raise RuntimeError("embedder crashed")

    with pytest.raises(RuntimeError, match="embedder crashed"):
        build_index(src, out, embedder=broken)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_checkpoint_embedder_is_recorded_and_reloaded_for_dense_search(tmp_path):
    from lmforge.embed import embed_texts
    from lmforge.infer.loading import load_for_generation
    from tests.helpers import tiny_chat_model

    ckpt = tiny_chat_model(tmp_path / "m")
    src = _folder(tmp_path)
    build_index(src, tmp_path / "idx", embedder=ckpt)
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["embedder"] == str(ckpt.resolve())
    index = Index.open(tmp_path / "idx")
    hits = index.search("yellow bananas", k=4, mode="dense")
    model, tok = load_for_generation(ckpt, "cpu")
    texts = [h.chunk.search_text for h in hits]
    cosines = embed_texts(model, tok, texts, max_len=128) @ embed_texts(model, tok, ["yellow bananas"], max_len=128)[0]
    np.testing.assert_allclose([h.score for h in hits], cosines, rtol=1e-4, atol=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == 3  # every chunk, ranked by cosine
