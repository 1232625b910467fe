"""The cost of a retrieval index (`lmforge.rag.build_index`) and of searching it.

    python benchmarks/rag_index.py
    python benchmarks/rag_index.py --smoke    # seconds: the email/mime subpackage, a smaller embedder

The corpus is the Python standard library's email/ package (a copy in a temporary folder, so a file can be
edited). Four builds: cold with BM25 alone; again with nothing changed (every file kept by size and mtime); after
one file is edited (only it re-chunked); cold with an embedder, a randomly initialised lmforge model of
d_model 256 and 4 layers (the speed of a small encoder; its embeddings mean nothing). Then the search latency of
the stdlib's own docstring first lines as queries, in bm25 and hybrid mode. One CPU thread.
The last line sums up as key=value pairs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from lmforge.rag import Index, build_index

QUERIES = ["parse a MIME message from bytes", "encode a header with quoted printable", "email address parsing",
           "policy for line length of headers", "iterate over the parts of a multipart message",
           "base64 encode the body", "decode RFC 2047 encoded words", "generator that flattens a message tree"]


def tiny_embedder(directory: Path, d_model: int, n_layers: int) -> Path:
    """A random lmforge checkpoint with a byte-level tokenizer trained on the corpus itself."""
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted((directory.parent / "src").rglob("*.py"))]
    tok = train_tokenizer(iter(texts), vocab_size=2048)
    tok.save(directory / "tok.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=n_layers, d_model=d_model, n_heads=4, n_kv_heads=4,
                     head_dim=d_model // 4, mlp_hidden=4 * d_model, max_seq_len=512)  # fmt: skip
    torch.manual_seed(0)
    return save_model(directory / "ckpt", Transformer(args), args, directory / "tok.json")


def timed_build(src: Path, out: Path, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    stats = build_index(src, out, **kw)
    return time.perf_counter() - start, stats


def search_ms(index: Index, mode: str) -> float:
    index.search(QUERIES[0], k=4, mode=mode)  # the embedder loads on the first dense search
    times = []
    for q in QUERIES * 3:
        start = time.perf_counter()
        index.search(q, k=4, mode=mode)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the email/mime subpackage and a 2-layer embedder")
    smoke = parser.parse_args().smoke
    torch.set_num_threads(1)
    email = Path(sysconfig.get_paths()["stdlib"]) / "email"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "src"
        shutil.copytree(email / "mime" if smoke else email, src, ignore=shutil.ignore_patterns("__pycache__"))
        files = sorted(p for p in src.rglob("*") if p.is_file())
        mb = sum(p.stat().st_size for p in files) / 1e6
        cold_s, cold = timed_build(src, root / "bm25")
        warm_s, warm = timed_build(src, root / "bm25")
        edited = [p for p in files if p.suffix == ".py"][len(files) // 2]
        edited.write_text(edited.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
        edit_s, edit = timed_build(src, root / "bm25")
        (root / "model").mkdir()
        ckpt = tiny_embedder(root / "model", 128 if smoke else 256, 2 if smoke else 4)
        dense_s, dense = timed_build(src, root / "dense", embedder=ckpt)
        bm25_ms = search_ms(Index.open(root / "bm25"), "bm25")
        hybrid_ms = search_ms(Index.open(root / "dense"), "hybrid")
    rows = [("cold, BM25", cold_s, cold), ("unchanged", warm_s, warm), ("one file edited", edit_s, edit),
            ("cold, BM25 + embedder", dense_s, dense)]  # fmt: skip
    print(f"corpus: {len(files)} files, {mb:.2f} MB, {cold.chunks} chunks")
    print("| build | s | files/s | chunks/s | kept | re-chunked |\n|---|---|---|---|---|---|")
    for name, s, st in rows:
        print(f"| {name} | {s:.3f} | {st.files / s:.0f} | {st.new_chunks / s:.0f} | {st.kept} | "
              f"{st.added + st.changed} |")
    print(f"search (median of {3 * len(QUERIES)}, k=4): bm25 {bm25_ms:.2f} ms, hybrid {hybrid_ms:.2f} ms")
    print(f"files={len(files)} chunks={cold.chunks} bm25_files_per_s={cold.files / cold_s:.0f} "
          f"bm25_chunks_per_s={cold.new_chunks / cold_s:.0f} unchanged_s={warm_s:.3f} edit_s={edit_s:.3f} "
          f"edit_rechunked={edit.changed} dense_chunks_per_s={dense.new_chunks / dense_s:.1f} "
          f"bm25_search_ms={bm25_ms:.2f} hybrid_search_ms={hybrid_ms:.2f}")


if __name__ == "__main__":
    main()
