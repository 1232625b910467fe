"""Bits per byte and the xz reference, checked against values computed by hand and by the real xz binary."""

import lzma
import math
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from lmforge.eval.perplexity import XzMeter, score_texts, xz_bits_per_byte
from lmforge.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = [(STDLIB / name).read_text(encoding="utf-8") for name in ("json/decoder.py", "json/encoder.py", "bisect.py")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


class Uniform(torch.nn.Module):
    """Assigns every token the same probability 1/V: its loss is exactly ln V per scored token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab)


def test_uniform_model_scores_ln_v_per_token_and_every_token_once(tokenizer):
    v = tokenizer.vocab_size
    n_tokens = sum(len(tokenizer.encode(t)) for t in TEXTS)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    for seq_len in (7, 64, 100_000):  # window size must not change which tokens are scored
        s = score_texts(Uniform(v), tokenizer, TEXTS, seq_len=seq_len, batch_size=3)
        assert (s.tokens, s.bytes, s.docs) == (n_tokens, n_bytes, 3)
        assert s.loss == pytest.approx(math.log(v), rel=1e-6)
        assert s.bpb == pytest.approx(n_tokens * math.log2(v) / n_bytes, rel=1e-6)


def test_max_tokens_trims_the_text_and_the_bytes_it_counts(tokenizer):
    seen = []
    s = score_texts(Uniform(tokenizer.vocab_size), tokenizer, TEXTS, seq_len=32, max_tokens=50, sink=seen.append)
    assert s.tokens == 50 and s.docs == 1
    assert len(seen) == 1 and s.bytes == len(seen[0].encode())
    assert TEXTS[0].startswith(seen[0]) and len(seen[0]) < len(TEXTS[0])


def test_xz_meter_per_document_and_concatenated_equal_one_shot_lzma():
    docs = [t.encode() for t in TEXTS]
    raw = sum(map(len, docs))
    per_doc = sum(len(lzma.compress(d, format=lzma.FORMAT_RAW, filters=XzMeter.FILTERS)) for d in docs)
    concat = len(lzma.compress(b"".join(docs), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
    assert xz_bits_per_byte(TEXTS) == (8 * per_doc / raw, 8 * concat / raw)
    meter = XzMeter()
    for t in TEXTS:
        meter(t)
    assert meter.raw_bytes == raw and meter.concat_bpb == meter.concat_bpb  # flushing is done once, safely
    # one stream can reuse text across documents, so it never does worse than compressing them one by one
    assert 0.5 < meter.concat_bpb < meter.bpb < 3.0


@pytest.mark.skipif(shutil.which("xz") is None, reason="the xz command is not installed")
def test_xz_meter_matches_the_xz_command_line():
    per_doc = 0
    for t in TEXTS:
        out = subprocess.run(["xz", "--format=raw", "-9e", "-c"], input=t.encode(), capture_output=True, check=True)
        per_doc += len(out.stdout)
    raw = sum(len(t.encode()) for t in TEXTS)
    concat = subprocess.run(["xz", "-9e", "-c"], input="".join(TEXTS).encode(), capture_output=True, check=True)
    per_doc_bpb, concat_bpb = xz_bits_per_byte(TEXTS)
    assert per_doc_bpb == 8 * per_doc / raw  # the same encoder and preset: byte for byte the same size
    assert concat_bpb == pytest.approx(8 * len(concat.stdout) / raw, rel=0.01)  # container details may differ


def test_empty_input_scores_nothing(tokenizer):
    s = score_texts(Uniform(tokenizer.vocab_size), tokenizer, ["", ""], seq_len=16)
    assert (s.tokens, s.bytes) == (0, 0)
    assert all(math.isnan(v) for v in xz_bits_per_byte([]))
