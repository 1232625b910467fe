import json

import numpy as np
import pytest

from lmforge.data.curate import run_curate
from lmforge.data.curated import iter_split_texts
from lmforge.data.readers import stdlib_root
from lmforge.data.shards import open_split, run_shards, token_dtype
from lmforge.data.config import DataConfig, ShardsConfig
from lmforge.tokenizer import Tokenizer, train_tokenizer

SHARD_TOKENS = 4000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Curated stdlib `json` and `email/mime` packages plus a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    for pkg in ("json", "email/mime"):
        for path in sorted((stdlib_root() / pkg).glob("*.py")):
            dest = src / pkg / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    run_curate(DataConfig(source=str(src), val_fraction=0.3, min_chars=0), root / "curate")
    tok = train_tokenizer(iter_split_texts(root / "curate", "train"), vocab_size=500)
    tok.save(root / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def shards(corpus):
    out = corpus / "shards"
    metrics = run_shards(corpus / "curate", corpus / "tokenizer.json", ShardsConfig(shard_tokens=SHARD_TOKENS), out)
    return out, metrics


def _texts(corpus, split):
    return list(iter_split_texts(corpus / "curate", split))


def test_token_dtype_choice():
    assert token_dtype(8192) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(1_000_000).itemsize == 4


def test_every_document_decodes_back_from_its_recorded_offsets(corpus, shards):
    out, _ = shards
    tok = Tokenizer.from_file(corpus / "tokenizer.json")
    for split in ("train", "val"):
        texts = _texts(corpus, split)
        data = open_split(out, split)
        assert data.n_docs == len(texts)
        assert data.dtype == np.dtype("<u2")
        ends = list(data.doc_starts[1:]) + [data.n_tokens]
        all_tokens = data.slice(0, data.n_tokens)
        assert all_tokens.dtype == np.int64
        # BOS sits exactly at the recorded starts and nowhere else.
        assert np.array_equal(np.flatnonzero(all_tokens == tok.bos_id), data.doc_starts)
        for text, start, end in zip(texts, data.doc_starts, ends):
            doc = data.slice(int(start), int(end))
            assert doc[0] == tok.bos_id
            assert tok.decode(doc) == text
            assert list(doc[1:]) == tok.encode(text)


def test_shards_roll_over_and_no_document_straddles(corpus, shards):
    out, _ = shards
    index = json.loads((out / "index.json").read_text())
    train = index["splits"]["train"]
    assert len(train["shards"]) >= 3
    assert [s["file"] for s in train["shards"]] == [f"train_{k:05d}.bin" for k in range(len(train["shards"]))]
    for shard in train["shards"]:
        tokens = np.fromfile(out / shard["file"], dtype="<u2")
        starts = np.load(out / shard["file"].replace(".bin", ".docs.npy"))
        assert len(tokens) == shard["n_tokens"] and len(starts) == shard["n_docs"]
        assert starts[0] == 0 and tokens[0] == 0  # each shard opens with a whole document
        # Only a single document may exceed the shard budget.
        assert shard["n_tokens"] <= SHARD_TOKENS or shard["n_docs"] == 1
    sizes = [s["n_tokens"] for s in train["shards"]]
    doc_lengths = np.diff(list(open_split(out, "train").doc_starts) + [train["n_tokens"]])
    # A shard closes only when the next document would not fit.
    next_doc = np.cumsum([s["n_docs"] for s in train["shards"]])[:-1]
    for size, k in zip(sizes, next_doc):
        assert size + doc_lengths[k] > SHARD_TOKENS


def test_index_and_metrics_agree(corpus, shards):
    out, metrics = shards
    index = json.loads((out / "index.json").read_text())
    assert (index["format"], index["dtype"], index["vocab_size"], index["bos_id"], index["eos_id"]) == (
        1, "uint16", 500, 0, 1,
    )
    for split in ("train", "val"):
        info = index["splits"][split]
        texts = _texts(corpus, split)
        assert info["n_docs"] == len(texts) == metrics[f"{split}_docs"]
        assert info["n_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert info["n_tokens"] == sum(s["n_tokens"] for s in info["shards"]) == metrics[f"{split}_tokens"]
        data = open_split(out, split)
        assert (data.n_tokens, data.n_docs, data.n_bytes) == (info["n_tokens"], info["n_docs"], info["n_bytes"])
    assert metrics["val_bytes"] == index["splits"]["val"]["n_bytes"]
    assert metrics["tokens_per_s"] > 0
    assert not list(out.glob("*.tmp-*"))


def test_slice_spans_shard_files(shards):
    out, _ = shards
    index = json.loads((out / "index.json").read_text())
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    flat = np.concatenate([np.fromfile(out / f, dtype="<u2") for f in files]).astype(np.int64)
    data = open_split(out, "train")
    first = index["splits"]["train"]["shards"][0]["n_tokens"]
    assert np.array_equal(data.slice(first - 5, first + 7), flat[first - 5 : first + 7])
    assert np.array_equal(data.slice(0, data.n_tokens), flat)
    assert data.slice(10, 10).shape == (0,)
    with pytest.raises(IndexError, match="outside"):
        data.slice(0, data.n_tokens + 1)


def _all_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_output_identical_for_any_worker_count(corpus, tmp_path):
    for workers in (1, 2):
        cfg = ShardsConfig(shard_tokens=SHARD_TOKENS, workers=workers)
        run_shards(corpus / "curate", corpus / "tokenizer.json", cfg, tmp_path / f"w{workers}")
    assert _all_bytes(tmp_path / "w1") == _all_bytes(tmp_path / "w2")


def test_rerun_removes_stale_shards(corpus, tmp_path):
    out = tmp_path / "out"
    run_shards(corpus / "curate", corpus / "tokenizer.json", ShardsConfig(shard_tokens=SHARD_TOKENS), out)
    run_shards(corpus / "curate", corpus / "tokenizer.json", ShardsConfig(shard_tokens=10**9), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "train_00000.bin", "train_00000.docs.npy", "val_00000.bin", "val_00000.docs.npy",
    ]


def test_size_mismatch_and_missing_index_are_named(corpus, tmp_path):
    out = tmp_path / "out"
    run_shards(corpus / "curate", corpus / "tokenizer.json", ShardsConfig(shard_tokens=SHARD_TOKENS), out)
    shard = out / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train_00001.bin"):
        open_split(out, "train")
    open_split(out, "val")  # the other split is still readable
    with pytest.raises(ValueError, match="no split 'test'"):
        open_split(out, "test")
    (out / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json"):
        open_split(out, "val")


def test_uint32_shards_are_read_back(tmp_path):
    tokens = np.array([0, 70_000, 5, 0, 99_999], dtype="<u4")
    tokens.tofile(tmp_path / "train_00000.bin")
    np.save(tmp_path / "train_00000.docs.npy", np.array([0, 3], dtype=np.int64))
    index = {
        "format": 1, "dtype": "uint32", "vocab_size": 100_000, "bos_id": 0, "eos_id": 1,
        "splits": {"train": {"shards": [{"file": "train_00000.bin", "n_tokens": 5, "n_docs": 2}],
                             "n_tokens": 5, "n_docs": 2, "n_bytes": 9}},
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    data = open_split(tmp_path, "train")
    assert data.dtype == np.dtype("<u4")
    assert data.slice(0, 5).tolist() == [0, 70_000, 5, 0, 99_999]
    assert data.doc_starts.tolist() == [0, 3]
