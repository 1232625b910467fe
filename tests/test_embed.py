"""Embeddings from a checkpoint, retrieval recall, the stdlib docstring -> code task and `lmforge embed`."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.readers import stdlib_root
from lmforge.data.curate import split_of
from lmforge.embed import HELD_OUT_FRACTION, MIN_CODE_LINES, MIN_QUERY_WORDS, embed_texts, retrieval_recall, stdlib_pairs
from lmforge.model.io import save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import train_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "import os", "", "a much longer text " * 20, "class A:\n    pass\n"]


@pytest.fixture(scope="module")
def tok():
    root = stdlib_root()
    return train_tokenizer([(root / f).read_text(encoding="utf-8") for f in ("textwrap.py", "string.py")], 400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8,
                     mlp_hidden=64, max_seq_len=64)  # fmt: skip
    return Transformer(args), args


def test_retrieval_recall_on_hand_made_embeddings():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    d = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # q2 scores d0 (1.0) above its own d2 (0.6): rank 1; q0 and q1 rank their own doc first.
    assert retrieval_recall(q, d, ks=(1, 2, 3)) == {"recall@1": 2 / 3, "recall@2": 1.0, "recall@3": 1.0}
    same = np.ones((4, 3))
    assert retrieval_recall(same, same, ks=(1, 3, 4)) == {"recall@1": 0.0, "recall@3": 0.0, "recall@4": 1.0}
    assert retrieval_recall(np.eye(5), np.eye(5)) == {"recall@1": 1.0, "recall@10": 1.0}
    with pytest.raises(ValueError, match="one doc per query"):
        retrieval_recall(np.eye(3), np.eye(2))


def test_embed_texts_is_normalised_and_independent_of_batching(tok, model):
    m, _ = model
    one = embed_texts(m, tok, TEXTS, batch_size=1, max_len=64)
    many = embed_texts(m, tok, TEXTS, batch_size=3, max_len=64)
    assert one.shape == (len(TEXTS), 32) and one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one, many, atol=1e-5)  # padding and batch order do not leak into an embedding
    assert not np.allclose(one[0], one[1])
    assert m.training  # the caller's mode is restored
    short = embed_texts(m, tok, [TEXTS[3]], max_len=8)
    assert not np.allclose(short[0], one[3])  # max_len truncates
    assert embed_texts(m, tok, []).shape == (0, 0)


def test_stdlib_pairs_are_held_out_by_the_curate_split_and_deterministic():
    from lmforge.recipe import load_recipe

    # The held-out files are the ones the default run's curate stage puts in curate/val (the sft stage's rule).
    assert HELD_OUT_FRACTION == load_recipe(None).data.val_fraction
    pairs = stdlib_pairs("test")
    assert len(pairs) > 200
    assert all(split_of(p.id.split(":")[0], HELD_OUT_FRACTION) == "val" for p in pairs)
    assert len({p.summary for p in pairs}) == len(pairs)
    for p in pairs:  # a query of a few words, code with a body, and no docstring left in the code
        assert len(p.summary.split()) >= MIN_QUERY_WORDS and p.summary in " ".join(p.docstring.split())
        assert sum(1 for line in p.code.splitlines() if line.strip()) >= MIN_CODE_LINES
        assert p.docstring not in p.code and p.code.startswith(p.signature)
    subset = stdlib_pairs("test", max_pairs=50)
    ids = [p.id for p in pairs]
    positions = [ids.index(p.id) for p in subset]
    assert len(subset) == 50 and positions == sorted(positions)  # an evenly spread subset, in file order
    assert positions[0] == 0 and positions[-1] == len(pairs) - 1
    with pytest.raises(ValueError, match="allowed values"):
        stdlib_pairs("val")


def test_training_pairs_come_from_the_other_files_and_never_repeat_a_held_out_prompt():
    held_out = stdlib_pairs("test", val_fraction=0.3)
    train = stdlib_pairs("train", val_fraction=0.3)
    assert all(split_of(p.id.split(":")[0], 0.3) == "train" for p in train)
    assert not {p.prompt for p in held_out} & {p.prompt for p in train}
    # A larger fraction holds out more files, and every file a smaller one holds out (split_of is a threshold).
    assert {p.id for p in stdlib_pairs("test")} <= {p.id for p in held_out}


def test_embed_cli(tmp_path, tok, model):
    m, args = model
    tok.save(tmp_path / "tokenizer.json")
    ckpt = save_model(tmp_path / "ckpt", m, args, tmp_path / "tokenizer.json")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(["x = 1\n", "def f():\n    pass\n", "print('hi')\n"]):
        (docs / f"{i}.py").write_text(text, encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(ckpt), "--text", str(docs), "-o", str(tmp_path / "e.npy")])
    assert result.exit_code == 0, result.output
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (3, 32)
    assert (tmp_path / "e.npy.ids.txt").read_text(encoding="utf-8").split() == ["0.py", "1.py", "2.py"]
    result = runner.invoke(app, ["embed", str(ckpt), "--pairs", "stdlib", "--max-len", "32"])
    assert result.exit_code == 0, result.output
    assert "recall@1=" in result.output and "recall@10=" in result.output
    assert runner.invoke(app, ["embed", str(ckpt)]).exit_code == 2
    assert runner.invoke(app, ["embed", str(ckpt), "--pairs", "other"]).exit_code == 2


def test_pair_batches_lay_pairs_out_as_views_and_resume(tok):
    from lmforge.embed import PairBatches

    pairs = stdlib_pairs("train", max_pairs=40)
    loader = PairBatches(pairs, tok, batch_size=8, max_len=24, seed=3)
    first = next(loader)
    assert first["input_ids"].shape[0] == 16 and first["mask"].dtype == torch.bool
    assert (first["input_ids"][:, 0] == tok.bos_id).all()  # every text starts with BOS, queries then codes
    assert (first["input_ids"][~first["mask"]] == tok.pad_id).all() and first["mask"].sum(1).max() <= 24
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]  # crosses the 5-batch epoch boundary
    again = PairBatches(pairs, tok, batch_size=8, max_len=24, seed=3)
    again.load_state_dict(state)
    for a, b in zip(expected, (next(again) for _ in range(6))):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_finetune_on_pairs_improves_the_contrastive_loss(tmp_path, tok, model):
    from lmforge.embed import finetune_on_pairs

    m, args = model
    tok.save(tmp_path / "tokenizer.json")
    ckpt = save_model(tmp_path / "ckpt", m, args, tmp_path / "tokenizer.json")
    metrics = finetune_on_pairs(ckpt, tmp_path / "ft", steps=12, batch_size=8, lr=3e-3, max_len=32)
    losses = [__import__("json").loads(line)["loss"] for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["steps"] == 12 and (tmp_path / "ft" / "final" / "model.safetensors").exists()
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
