"""Classification heads on a frozen backbone: reading labelled files, the split, pooling, the head, the metrics, save
and load, and one run on real labelled data."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.finetune.classify import (
    classification_metrics,
    extract_features,
    label_vocab,
    load_classifier,
    read_labelled,
    stratified_split,
    train_classifier,
    train_head,
)
from lmforge.model.io import load_checkpoint_tokenizer, load_model, save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PII = SHARED / "pii" / "enterprise_pii_classification.jsonl"
ALPACA = SHARED / "instruct" / "alpaca_data_first200.json"

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve twenty forty hundred".split()
ANIMALS = "cat dog horse mouse eagle otter badger rabbit falcon lizard whale shark".split()


def _synthetic(n: int, seed: int = 0) -> list[dict]:
    """Two clearly different token distributions: number words vs animal words, 3..12 words each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "number" if i % 2 else "animal"
        words = NUMBERS if label == "number" else ANIMALS
        out.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))), "label": label})
    return out


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny random-init 2-block checkpoint; its tokenizer, trained on the synthetic texts, has a token per word."""
    tmp = tmp_path_factory.mktemp("backbone")
    tok = train_tokenizer(iter([r["text"] for r in _synthetic(400, seed=1)]), vocab_size=600)
    tok.save(tmp / "tok.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8,
                     mlp_hidden=64, max_seq_len=32)  # fmt: skip
    torch.manual_seed(0)
    return save_model(tmp / "ckpt", Transformer(args), args, tmp / "tok.json")


@pytest.fixture(scope="module")
def separable(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("data") / "sep.jsonl", _synthetic(300))


@pytest.fixture(scope="module")
def trained(backbone, separable, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, train_classifier(backbone, separable, out, seed=0)


def test_bad_records_are_skipped_with_file_line_and_reason(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [
        '{"text": "good one", "label": "a"}',
        "{not json",
        '{"label": "a"}',
        '{"text": "   ", "label": "a"}',
        '{"text": "list label", "label": ["a", "b"]}',
        '{"text": "float label", "label": 0.5}',
        '{"text": "int among strings", "label": 3}',
        '{"text": 42, "label": "b"}',
        "",
        '{"text": "good two", "label": "b"}',
        "[1, 2]",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        data = read_labelled(path)
    assert data.texts == ["good one", "good two"] and data.labels == ["a", "b"]
    assert data.skipped.count == 8
    assert data.skipped.by_reason == {"invalid JSON": 1, "missing field": 1, "empty field": 1, "non-scalar label": 1,
                                      "wrong type": 3, "mixed label types": 1}  # fmt: skip
    assert data.skipped.examples[0].startswith(f"{path}:2: invalid JSON")
    assert data.skipped.examples[1] == f"{path}:3: missing field: 'text'"
    assert data.skipped.examples[3] == f"{path}:5: non-scalar label: 'label' is a list"
    assert "skipped 8 records" in caplog.text
    # A JSON array names records by index; a CSV row by its line; a ragged row is skipped, not misread.
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": "x", "label": True}, {"text": "y"}, {"text": "z", "label": False}]))
    data = read_labelled(arr)
    assert data.labels == [True, False] and data.skipped.examples == [f"{arr}[1]: missing field: 'label'"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"hello, world",pos\nonly text\nbad,neg,extra\n"multi\nline",neg\n')
    data = read_labelled(csv_path)
    assert data.texts == ["hello, world", "multi\nline"] and data.labels == ["pos", "neg"]
    assert data.skipped.examples == [f"{csv_path}:3: missing field: 'label'",
                                     f"{csv_path}:4: ragged row: 3 fields, the header has 2"]  # fmt: skip


def test_fields_are_detected_or_the_error_names_file_and_fields(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"id": 1, "Sentence": "a b", "category": "x"},
                                               {"id": 2, "Sentence": "c d", "category": "y"}])  # fmt: skip
    data = read_labelled(path)
    assert (data.text_field, data.label_field, data.texts) == ("Sentence", "category", ["a b", "c d"])
    tsv = tmp_path / "t.tsv"
    tsv.write_text('content\ttarget\tlabel\n"quoted" text\t1\t0\n', encoding="utf-8")  # unquoted TSV: kept as is
    data = read_labelled(tsv)  # "label" outranks "target"
    assert (data.texts, data.labels, data.label_field) == (['"quoted" text'], ["0"], "label")
    assert read_labelled(tsv, label_field="target").labels == ["1"]

    unknown = _write_jsonl(tmp_path / "u.jsonl", [{"body": "a", "y": 1}, {"body": "b", "y": 0}, {"body": "c", "y": 1}])
    with pytest.raises(ValueError) as err:
        read_labelled(unknown)
    assert str(err.value) == (f"{unknown}: none of the 3 records read has a text field this can detect (looked for "
                              "text, sentence, content, prompt, input, query, question); the first has the fields "
                              "body, y: name them with --text-field and --label-field")  # fmt: skip
    with pytest.raises(ValueError, match="none of the 2 records read"):  # the limit bounds the search too
        read_labelled(unknown, limit=2)
    with pytest.raises(ValueError, match="has a label field this can detect"):
        read_labelled(unknown, text_field="body")
    assert read_labelled(unknown, text_field="body", label_field="y").labels == [1, 0, 1]
    with pytest.raises(ValueError) as err:  # a named field the file lacks: said once, with the fields it has
        read_labelled(unknown, text_field="body", label_field="nope")
    assert str(err.value) == f"{unknown}:1: no field 'nope'; fields: body, y (set by --label-field)"


def test_a_misnamed_label_field_is_one_error_and_the_chosen_fields_are_logged(caplog):
    if not PII.is_file():
        pytest.skip(f"{PII} (shared data) is not here")
    with pytest.raises(ValueError) as err:
        read_labelled(PII, label_field="labelz")
    assert str(err.value) == f"{PII}:1: no field 'labelz'; fields: query, choices, gold (set by --label-field)"
    with caplog.at_level(logging.INFO, logger="lmforge.finetune.labelled"):
        data = read_labelled(PII, limit=200)
    counts = Counter(data.labels)
    assert len(data.labels) == 200 and set(counts) == {0, 1}
    assert (f"{PII}: text field 'query' (detected), label field 'gold' (detected); 200 records read, 200 kept, "
            f"0 skipped; 2 labels: 0 ({counts[0]}), 1 ({counts[1]})") in caplog.messages  # fmt: skip


def test_stratified_split_keeps_every_class_in_both_parts():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 2 + ["d"]
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    for label, n_val in (("a", 10), ("b", 2), ("c", 1)):
        assert sum(labels[i] == label for i in val) == n_val
        assert any(labels[i] == label for i in train)
    assert [labels[i] for i in train].count("d") == 1  # a single example can only be trained on
    assert stratified_split(labels, 0.2, seed=3) == (train, val)
    assert stratified_split(labels, 0.2, seed=4) != (train, val)
    assert label_vocab(["b", "a", "b"]) == ["a", "b"] and label_vocab([True, False]) == [False, True]
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 0.0, seed=0)


def test_pooling_reads_real_tokens_only_under_right_padding(backbone, caplog):
    model, _ = load_model(backbone)
    tok = load_checkpoint_tokenizer(backbone)
    texts = ["cat", "one two three four", "dog horse", "eagle " * 40]  # the last is cut to max_seq_len
    with caplog.at_level(logging.WARNING):
        last, stats = extract_features(model, tok, texts, "last", batch_size=4)
    mean, _ = extract_features(model, tok, texts, "mean", batch_size=4)
    assert stats["truncated_texts"] == 1 and "1 of 4 texts are longer than max_seq_len=32" in caplog.text
    lengths = [min(1 + len(tok.encode(t)), 32) for t in texts]
    assert len(set(lengths)) > 1 and stats["tokens"] == sum(lengths)  # the batch really is padded
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = torch.tensor([[tok.bos_id, *tok.encode(text)][:32]])
            alone = model(ids, return_hidden=True)[0]
            torch.testing.assert_close(last[i], alone[-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mean[i], alone[1:].mean(0), atol=1e-5, rtol=1e-5)
        # The padded batch's final position is not the short text's last real token: the test can tell.
        width = max(lengths)
        padded = torch.full((1, width), tok.pad_id)
        padded[0, : lengths[0]] = torch.tensor([tok.bos_id, *tok.encode(texts[0])])
        assert not torch.allclose(model(padded, return_hidden=True)[0, -1], last[0], atol=1e-3)


def test_backbone_is_bit_identical_after_training(backbone, separable, trained):
    model, _ = load_model(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = load_checkpoint_tokenizer(backbone)
    data = read_labelled(separable)
    features, _ = extract_features(model, tok, data.texts[:64], "mean")
    targets = torch.tensor([label_vocab(data.labels).index(y) for y in data.labels[:64]])
    train_head(features, targets, 2, epochs=5, lr=1e-2, batch_size=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The run wrote no backbone of its own and left the checkpoint's weights as they were.
    out, _ = trained
    assert sorted(p.name for p in (out / "classifier").iterdir()) == ["classifier.json", "head.safetensors"]
    on_disk = load_file(str(backbone / "model.safetensors"))
    assert all(torch.equal(before[k], on_disk[k]) for k in on_disk)


def test_separable_labels_are_learned_and_shuffled_labels_are_not(backbone, separable, trained, tmp_path):
    _, m = trained
    assert m["accuracy"]["value"] == 1.0 and m["train_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert (m["n_train"], m["n_val"], m["labels"]) == (240, 60, ["animal", "number"])
    assert m["majority_baseline"]["accuracy"]["value"] == 0.5
    assert m["feature_tokens_per_s"] > 0 and m["seconds"] > 0 and m["skipped_records"] == 0
    records = _synthetic(300)
    shuffled = [r["label"] for r in records]
    random.Random(7).shuffle(shuffled)
    control = _write_jsonl(tmp_path / "shuffled.jsonl", [{**r, "label": y} for r, y in zip(records, shuffled)])
    c = train_classifier(backbone, control, tmp_path / "control", seed=0)
    assert c["accuracy"]["n"] == 60 and c["accuracy"]["value"] <= 0.7  # chance is 0.5; sd 0.065 on 60
    # Seeded: the same run gives the same head, bit for bit.
    again = train_classifier(backbone, control, tmp_path / "again", seed=0)
    assert again["accuracy"] == c["accuracy"] and again["final_train_loss"] == c["final_train_loss"]
    a, b = (load_file(str(tmp_path / run / "classifier/head.safetensors")) for run in ("control", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_predict_reproduces_the_measured_predictions(backbone, separable, trained, tmp_path):
    out, m = trained
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    meta = json.loads((out / "classifier/classifier.json").read_text())
    assert meta["labels"] == ["animal", "number"] and meta["pooling"] == "mean" and meta["d_model"] == 32
    assert meta["checkpoint"] == str(backbone.resolve()) and meta["text_field"] == "text"
    clf = load_classifier(out / "classifier")
    data = read_labelled(separable)
    _, val = stratified_split(data.labels, 0.2, 0)
    texts = [data.texts[i] for i in val]
    labels, probs = clf.predict(texts)
    assert labels == [data.labels[i] for i in val]  # accuracy 1.0 as measured
    assert probs.shape == (60, 2) and torch.allclose(probs.sum(-1), torch.ones(60))
    one_by_one = torch.cat([clf.predict([t], batch_size=1)[1] for t in texts[:8]])
    torch.testing.assert_close(one_by_one, probs[:8], atol=1e-5, rtol=1e-5)
    # The head is only meaningful on its own backbone: another checkpoint is refused, a copy is accepted.
    model, args = load_model(backbone)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    other = save_model(tmp_path / "other", model, args, backbone / "tokenizer.json")
    with pytest.raises(ValueError, match="not the backbone this head was trained on"):
        load_classifier(out / "classifier", checkpoint=other)
    copy = save_model(tmp_path / "copy", load_model(backbone)[0], args, backbone / "tokenizer.json")
    assert load_classifier(out / "classifier", checkpoint=copy).predict(texts[:4])[0] == labels[:4]


def test_metrics_on_a_hand_checked_case():
    # true: a a a b b c; predicted: a a b b b a. Class a: tp 2 fp 1 fn 1; b: tp 2 fp 1 fn 0; c: tp 0 fp 0 fn 1.
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], ["a", "b", "c"], majority=0)
    acc = m["accuracy"]
    assert acc["value"] == pytest.approx(4 / 6) and acc["n"] == 6
    # Wilson, z = 1.96, p = 2/3, n = 6: centre (p + z^2/12) / (1 + z^2/6) = 0.6016, half-width 0.3016.
    assert acc["ci95"] == pytest.approx([0.3000, 0.9032], abs=5e-4)
    assert m["majority_baseline"]["label"] == "a" and m["majority_baseline"]["accuracy"]["value"] == 0.5
    assert m["majority_baseline"]["accuracy"]["ci95"] == pytest.approx([0.1876, 0.8124], abs=5e-4)
    by = {c["label"]: c for c in m["per_class"]}
    assert (by["a"]["precision"], by["a"]["recall"], by["a"]["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (by["b"]["precision"], by["b"]["recall"], by["b"]["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (by["c"]["precision"], by["c"]["recall"], by["c"]["f1"], by["c"]["support"]) == (0.0, 0.0, 0.0, 1)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert [c["support"] for c in m["per_class"]] == [3, 2, 1] and [c["predicted"] for c in m["per_class"]] == [3, 3, 0]


@pytest.mark.skipif(not PII.is_file() or not ALPACA.is_file(), reason=f"shared data not found under {SHARED}")
def test_real_labelled_data_beats_the_majority_baseline(tmp_path):
    """EnterprisePII passages (sensitive or not), a frozen random-init backbone with an English tokenizer, mean
    pooling: bag-of-token features already separate the classes better than always answering the majority."""
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    tok = train_tokenizer(iter([" ".join(r[k] for k in ("instruction", "input", "output")) for r in records]), 512)
    tok.save(tmp_path / "tok.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16,
                     mlp_hidden=128, max_seq_len=256)  # fmt: skip
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "ckpt", Transformer(args), args, tmp_path / "tok.json")
    m = train_classifier(ckpt, PII, tmp_path / "out", pooling="mean", limit=600, seed=0)
    assert (m["text_field"], m["label_field"], m["labels"], m["n_val"]) == ("query", "gold", [0, 1], 120)
    assert m["skipped_records"] == 0 and m["truncated_texts"] > 0
    assert m["accuracy"]["ci95"][0] > m["majority_baseline"]["accuracy"]["value"]


def test_the_sft_command_trains_a_classifier(backbone, separable, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["sft", str(backbone), "--task", "classify", "--data", str(separable), "-o",
                                      str(out), "--epochs", "20"])  # fmt: skip
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["pooling"] == "mean" and m["epochs"] == 20
    assert f"held-out accuracy {m['accuracy']['value']:.3f}" in result.output and "| 'number' |" in result.output
    bad = CliRunner().invoke(app, ["sft", str(backbone), "--task", "classify", "--data", str(separable), "-o",
                                   str(out), "train.max_steps=3"])  # fmt: skip
    assert bad.exit_code == 2 and "takes no train.* settings" in bad.output
