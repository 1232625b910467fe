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


def test_xz_meter_equals_one_shot_lzma_and_streaming_is_exact():
    data = "".join(TEXTS).encode()
    expected = 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    assert xz_bits_per_byte(TEXTS) == pytest.approx(expected, rel=1e-12)
    meter = XzMeter()
    for t in TEXTS:
        meter(t)
    assert meter.raw_bytes == len(data) and meter.bpb == meter.bpb  # flushing twice is safe
    assert 0.5 < meter.bpb < 3.0  # Python source compresses to a few bits per byte


@pytest.mark.skipif(shutil.which("xz") is None, reason="the xz command is not installed")
def test_xz_meter_matches_the_xz_command_line(tmp_path):
    data = "".join(TEXTS).encode()
    out = subprocess.run(["xz", "-9e", "-c"], input=data, capture_output=True, check=True).stdout
    cli_bpb = 8 * len(out) / len(data)
    assert xz_bits_per_byte(TEXTS) == pytest.approx(cli_bpb, rel=0.01)


def test_empty_input_scores_nothing(tokenizer):
    s = score_texts(Uniform(tokenizer.vocab_size), tokenizer, ["", ""], seq_len=16)
    assert (s.tokens, s.bytes) == (0, 0)
    assert math.isnan(xz_bits_per_byte([]))
