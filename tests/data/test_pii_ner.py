"""Named-entity PII: typed placeholders for names, organisations and street addresses, counts per kind, idempotence,
the curate stage's stats.json with data.pii_ner on and off, and the error when spaCy or its model is missing."""

from __future__ import annotations

import json
import sys

import pytest

from lmforge.data import pii_ner
from lmforge.data.base_reader import Document
from lmforge.data.config import DataConfig
from lmforge.data.curate import run_curate
from lmforge.data.curated import iter_split_records
from lmforge.data.pii import PIIRedactor, find_pii, redact

pytest.importorskip("spacy")  # the `ner` / `dev` extra; the missing-dependency test below simulates its absence
ALL = pii_ner.NER_KINDS


@pytest.fixture(scope="module", autouse=True)
def model():
    """Loads the spaCy pipeline once for the module (about a second); every test then reuses the cached one."""
    return pii_ner._pipeline()


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("Yesterday Margaret Thompson signed the lease.", "Yesterday <PERSON> signed the lease.", {"PERSON": 1}),
        ("She has worked at Microsoft Corporation since 2019.", "She has worked at <ORG> since 2019.", {"ORG": 1}),
        ("Please send the parcel to 742 Evergreen Terrace, Springfield, IL 62704.",
         "Please send the parcel to <ADDRESS>.", {"ADDRESS": 1}),
        # Pattern kinds keep priority and their own placeholders; the title marks the name.
        ("Contact Dr. Anna Kowalski at anna.k@example.org or 555-123-4567.",
         "Contact Dr. <PERSON> at <EMAIL> or <PHONE>.", {"PERSON": 1, "EMAIL": 1, "PHONE": 1}),
        ("Peter Smith and IBM Research met at 10 Downing Street, London.",
         "<PERSON> and <ORG> met at <ADDRESS>.", {"PERSON": 1, "ORG": 1, "ADDRESS": 1}),
        # A middle initial makes a person of a name the model misses or calls an organisation.
        ("I met Ella H. Snider at 12 Crown Street, Apt 4, Leeds.", "I met <PERSON> at <ADDRESS>.",
         {"PERSON": 1, "ADDRESS": 1}),
    ],
)
def test_names_organisations_and_addresses_become_typed_placeholders(text, expected, counts):
    out, found = redact(text, ALL)
    assert out == expected
    assert dict(found) == counts
    assert redact(out, ALL) == (out, {})  # idempotent: placeholders are never read as names


def test_ordinary_capitalised_words_are_kept():
    for text in ("The Quick Brown Fox jumps over the Lazy Dog every Morning.",
                 "In Chapter Two the Hero finds a Sword near the Old Bridge."):  # fmt: skip
        assert redact(text, ALL) == (text, {})


def test_only_the_kinds_asked_for_and_patterns_unchanged_without_ner():
    text = "Peter Smith and IBM Research met at 10 Downing Street, London. Mail peter@example.com"
    assert redact(text, ["PERSON"])[0] == "<PERSON> and IBM Research met at 10 Downing Street, London. Mail <EMAIL>"
    assert redact(text) == (text.replace("peter@example.com", "<EMAIL>"), {"EMAIL": 1})
    assert [s.kind for s in find_pii(text, ALL)] == ["PERSON", "ORG", "ADDRESS", "EMAIL"]
    with pytest.raises(ValueError, match=r"unknown NER kinds \['LOCATION'\]: allowed values are"):
        pii_ner.find_entities(text, ["LOCATION"])


def test_filter_counts_per_kind_in_meta():
    doc = Document(id="d", text="Dear Mr. John Carter, your flat at 5 Baker Street, Apt 2 is ready.", source="t")
    out = PIIRedactor(ner=ALL).apply(doc)
    assert out.text == "Dear Mr. <PERSON>, your flat at <ADDRESS> is ready."
    assert out.meta["pii"] == {"ADDRESS": 1, "PERSON": 1}


def test_missing_spacy_names_the_package_to_install(monkeypatch):
    pii_ner._pipeline.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` now raises ImportError
    try:
        with pytest.raises(ImportError, match=r"data\.pii_ner needs spaCy.*pip install 'lmforge\[ner\]'"):
            redact("Margaret Thompson", ALL)
    finally:
        pii_ner._pipeline.cache_clear()


def test_missing_model_names_the_package_to_install(monkeypatch):
    pii_ner._pipeline.cache_clear()
    monkeypatch.setattr(pii_ner, "MODEL_PACKAGE", "en_core_web_sm_not_installed")
    try:
        with pytest.raises(ImportError, match=r"spaCy model en_core_web_sm_not_installed.*lmforge\[ner\]"):
            redact("Margaret Thompson", ALL)
    finally:
        pii_ner._pipeline.cache_clear()


def test_pii_ner_needs_pii():
    with pytest.raises(ValueError, match=r"data\.pii_ner=\['PERSON'\] needs data\.pii=true"):
        DataConfig(pii_ner=["PERSON"])


LETTERS = [
    "Dear Mr. John Carter, thank you for your order. It ships to 5 Baker Street, Apt 2, London next week. "
    "Our team at Acme Holdings Inc. will call you at 555-123-4567 before it leaves the warehouse.",
    "Meeting notes: Margaret Thompson presented the budget for the spring term. Everyone agreed that the numbers "
    "look reasonable and the next review is planned for the end of the month, after the holidays.",
]


def _curate(tmp_path, name, **settings):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in LETTERS), encoding="utf-8")
    out = tmp_path / name
    run_curate(DataConfig(source=str(src), pii=True, plots=False, workers=1, **settings), out)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    texts = sorted(r["text"] for s in ("train", "val") for r in iter_split_records(out, s))
    return stats, texts


def test_curate_counts_entities_per_kind_and_is_unchanged_with_the_option_off(tmp_path):
    stats, texts = _curate(tmp_path, "ner", pii_ner=["PERSON", "ORG", "ADDRESS"])
    assert stats["pii_found"] == {"ADDRESS": 1, "ORG": 1, "PERSON": 2, "PHONE": 1}
    assert texts[0].startswith("Dear Mr. <PERSON>, thank you for your order. It ships to <ADDRESS> next week. "
                               "Our team at <ORG> will call you at <PHONE> before")  # fmt: skip
    assert texts[1].startswith("Meeting notes: <PERSON> presented the budget")
    off_stats, off_texts = _curate(tmp_path, "off")
    assert off_stats["pii_found"] == {"PHONE": 1}
    assert off_texts == sorted(redact(t)[0] for t in LETTERS)  # exactly the pattern-only redaction
