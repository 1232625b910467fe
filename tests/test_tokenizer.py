import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lmforge.data.readers import stdlib_root
from lmforge.tokenizer import TokenizerConfig
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, bytes_per_token, run_tokenizer, train_tokenizer

FILES = ["json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py", "string.py", "bisect.py"]
VOCAB = 600


def _texts():
    root = stdlib_root()
    return [(root / f).read_text(encoding="utf-8") for f in FILES]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(_texts()), vocab_size=VOCAB)


def test_special_tokens_have_fixed_ids(tok):
    assert len(SPECIAL_TOKENS) == 72
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(72))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.token_to_id("<|user|>") == 4
    assert tok.token_to_id("<|end|>") == 6
    assert tok.mask_id == tok.token_to_id("<|mask|>") == 7
    assert tok.sentinel_ids == list(range(8, 72))
    assert tok.token_to_id("<|sentinel_63|>") == 71
    assert tok.special_ids == list(range(72))
    assert tok.token_to_id("no such token") is None
    assert tok.vocab_size == VOCAB


def test_vocab_never_smaller_than_bytes_plus_specials():
    small = train_tokenizer(["abc abc"], vocab_size=10)
    assert small.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert small.decode(small.encode("ünïcødé")) == "ünïcødé"


ODD_STRINGS = [
    "",
    "plain ascii",
    "emoji 🤖👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇫🇷",
    "CJK 漢字かなカナ한국어",
    "combining e\u0301 a\u0308\u0323 and zero-width\u200b\u200d joiners",
    "controls \x00\x01\x07\x1b[31m\x7f\x85 NUL\x00end",
    "mixed\r\nnewlines\rand\n\nblank\r\n\r\n",
    "\ttabs\t\tand    spaces   \n        \n",
    "RTL עברית العربية",
    "specials as text <|bos|><|user|>hi<|end|>",
    "\ufeffBOM kept and U+FFFF \uffff and max \U0010ffff",
    "digits 0123456789 ٣ ½ ①",
]


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_round_trip_of_odd_strings(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # text never forges a special token


def test_round_trip_of_random_code_points(tok):
    rng = random.Random(0)
    points = [p for p in range(0x110000) if not 0xD800 <= p <= 0xDFFF]
    for _ in range(50):
        text = "".join(chr(rng.choice(points)) for _ in range(rng.randint(1, 40)))
        assert tok.decode(tok.encode(text)) == text
    every_byte_char = "".join(chr(i) for i in range(256))
    assert tok.decode(tok.encode(every_byte_char)) == every_byte_char


def test_round_trip_of_stdlib_files(tok):
    root = stdlib_root()
    for rel in ["json/tool.py", "colorsys.py", "this.py"]:
        text = (root / rel).read_text(encoding="utf-8")
        assert tok.decode(tok.encode(text)) == text
    # Unseen code from the same package still compresses: the merges learned real structure.
    tool = (root / "json" / "tool.py").read_text(encoding="utf-8")
    assert len(tok.encode(tool)) < len(tool.encode("utf-8")) / 2


def test_indentation_and_digits(tok):
    ids = tok.encode("if x:\n    y = 1\n        return y\n")
    pieces = [tok.decode([i]) for i in ids]
    assert "\n   " in pieces  # newline + 4-space indent: one token, the 4th space leads " y"
    assert "\n       " in pieces  # newline + 8-space indent: one token
    assert len(ids) <= 12
    assert [tok.decode([i]) for i in tok.encode("12345")] == ["1", "2", "3", "4", "5"]


def test_decode_skips_special_tokens_unless_asked(tok):
    ids = [tok.bos_id] + tok.encode("x = 1") + [tok.eos_id]
    assert tok.decode(ids) == "x = 1"
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>x = 1<|eos|>"


def test_encode_batch_matches_encode(tok):
    texts = ODD_STRINGS + _texts()
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_and_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text(encoding="utf-8"))["model"]["type"] == "BPE"
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size
    for text in ODD_STRINGS:
        assert loaded.encode(text) == tok.encode(text)
    # encode_special_tokens is not stored in the file; loading must still treat "<|user|>" as plain text.
    assert 4 not in loaded.encode("<|user|>")
    with pytest.raises(FileNotFoundError, match="tokenizer stage"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_training_is_deterministic(tok):
    again = train_tokenizer(iter(_texts()), vocab_size=VOCAB)
    assert again.hf.to_str() == tok.hf.to_str()


def test_wrong_special_token_layout_is_rejected():
    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(["<|eos|>", "<|bos|>"])
    with pytest.raises(ValueError, match="<\\|bos\\|>"):
        Tokenizer(hf)


def test_tokenizer_without_reserved_tokens_asks_for_retraining():
    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(SPECIAL_TOKENS[:7])  # the layout before <|mask|> and the sentinels existed
    with pytest.raises(ValueError, match="<\\|mask\\|>.*retrain"):
        Tokenizer(hf)


def test_bytes_per_token_counts_utf8_bytes(tok):
    texts = ["é" * 10, "ab"]
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    assert bytes_per_token(tok, texts) == pytest.approx(22 / n_tokens)


def test_run_tokenizer_caps_training_text(tmp_path):
    curate = tmp_path / "curate"
    texts = _texts()
    for name, part in (("train", texts[:-1]), ("val", texts[-1:])):
        lines = [json.dumps({"id": str(i), "text": t, "source": "s"}) for i, t in enumerate(part)]
        # A plain .jsonl part: curated splits are read the same whatever output format wrote them.
        (curate / name).mkdir(parents=True)
        (curate / name / "part-00000.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cap = len(texts[0]) + 100
    metrics = run_tokenizer(curate, TokenizerConfig(vocab_size=500, max_train_chars=cap), tmp_path / "tok")
    assert metrics["train_chars"] == cap
    assert metrics["vocab_size"] == 500
    tok = Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json")
    val_text = texts[-1]
    assert metrics["bytes_per_token"] == round(len(val_text.encode()) / len(tok.encode(val_text)), 4)
    assert metrics["bytes_per_token"] > 1.5
    assert set(metrics) == {"vocab_size", "train_chars", "bytes_per_token", "bytes_per_token_split", "train_seconds",
                            "seconds"}  # fmt: skip
    assert metrics["bytes_per_token_split"] == "val"


def test_run_tokenizer_needs_curated_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="curate stage"):
        run_tokenizer(tmp_path, TokenizerConfig(), tmp_path / "tok")
