"""Labelled text for classification: reading, field detection, the label vocabulary and a stratified split.

Data: `.jsonl`, `.json` (one array), `.csv` or `.tsv` (a header row; `.tsv` is unquoted, tab-separated). The fields
are `text_field` / `label_field`, or, when not given, the first name of each list below that the first record's keys
hold (case-insensitive; a record holding neither is skipped and the next one asked):
    text:  text, sentence, content, prompt, input, query, question
    label: label, labels, category, class, target, gold
A named field the first record lacks, or no record (of the first `limit`) holding a detectable one, is a single
error listing the record's fields. The fields chosen and the label counts are logged.
Labels are strings, integers or booleans, one kind per file; the label
vocabulary is their sorted set. A bad record (unparsable, a missing / empty / mistyped field, a list or float label)
is skipped and counted with `file:line` (`file[i]` in a JSON array) and its reason; a file with no usable record
raises, naming the file and the fields it looked for. The held-out split is seeded and stratified: every class with
two or more examples lands in both parts.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.finetune.data import BadRecord, Skipped, iter_records, pick_field, require_fields

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "sentence", "content", "prompt", "input", "query", "question")
LABEL_FIELDS = ("label", "labels", "category", "class", "target", "gold")
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")

Label = str | int | bool


@dataclass
class Labelled:
    """The usable records of a file, the fields they were read from, and what was skipped."""

    texts: list[str]
    labels: list[Label]
    text_field: str
    label_field: str
    skipped: Skipped


def _delimited(path: Path, skipped: Skipped) -> Iterator[tuple[str, Any]]:
    """(file:line, row dict) for every row of a .csv / .tsv file; the line is the one the row ends on."""
    tsv = path.suffix == ".tsv"
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                skipped.add(f"{path}:{reader.line_num}", f"invalid {path.suffix[1:].upper()}: {e}")
                continue
            where = f"{path}:{reader.line_num}"
            if None in row:  # DictReader files surplus values under the key None
                skipped.add(where, f"ragged row: {len(row) - 1 + len(row[None])} fields, "
                                   f"the header has {len(reader.fieldnames or [])}")  # fmt: skip
                continue
            yield where, row


def _rows(path: Path, skipped: Skipped) -> Iterator[tuple[str, Any]]:
    return _delimited(path, skipped) if path.suffix in (".csv", ".tsv") else iter_records(path, skipped)


def _kind(label: Label) -> str:
    return type(label).__name__  # keeps bool and int apart: True == 1 would merge two classes


def _example(record: dict[str, Any], text_field: str, label_field: str) -> tuple[str, Label]:
    """(text, label) of one record; raises BadRecord with the reason."""
    text, label = record.get(text_field), record.get(label_field)
    for field, value in ((text_field, text), (label_field, label)):
        if value is None:
            raise BadRecord(f"missing field: {field!r}")
        if isinstance(value, str) and not value.strip():
            raise BadRecord(f"empty field: {field!r}")
    if not isinstance(text, str):
        raise BadRecord(f"wrong type: text {text_field!r} must be a string, got {type(text).__name__}")
    if isinstance(label, (list, dict)):
        raise BadRecord(f"non-scalar label: {label_field!r} is a {type(label).__name__}")
    if not isinstance(label, (str, int)):  # bool is an int
        raise BadRecord(f"wrong type: label {label_field!r} must be a string, integer or boolean, "
                        f"got {type(label).__name__}")  # fmt: skip
    return text, label


def read_labelled(path: str | Path, text_field: str | None = None, label_field: str | None = None,
                  limit: int | None = None) -> Labelled:  # fmt: skip
    """Every usable (text, label) record of `path` (the first `limit`), with the records skipped and why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled data file {path} does not exist")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; expected one of {list(SUFFIXES)}")
    skipped = Skipped()
    texts: list[str] = []
    labels: list[Label] = []
    fields: tuple[str, str] | None = None
    first_keys: list[str] | None = None
    for where, record in _rows(path, skipped):
        # While no record has shown the fields, every record read counts against the limit.
        if limit is not None and (len(texts) >= limit or (fields is None and skipped.count >= limit)):
            break
        if not isinstance(record, dict):
            skipped.add(where, f"wrong type: record must be an object, got {type(record).__name__}")
            continue
        if first_keys is None:
            first_keys = list(record)
            require_fields(where, record, {"--text-field": text_field, "--label-field": label_field})
        if fields is None:
            t = text_field or pick_field(list(record), TEXT_FIELDS)
            y = label_field or pick_field(list(record), LABEL_FIELDS)
            if t is None or y is None:
                skipped.add(where, f"no {'text' if t is None else 'label'} field")
                continue
            fields = (t, y)
        try:
            text, label = _example(record, *fields)
            if labels and _kind(label) != _kind(labels[0]):
                raise BadRecord(f"mixed label types: {label!r} is a {_kind(label)}, earlier labels are "
                                f"{_kind(labels[0])}s")  # fmt: skip
        except BadRecord as e:
            skipped.add(where, str(e))
            continue
        texts.append(text)
        labels.append(label)
    if fields is None and first_keys is not None:
        missing = "text" if text_field is None and pick_field(first_keys, TEXT_FIELDS) is None else "label"
        raise ValueError(f"{path}: none of the {skipped.count} records read has a {missing} field this can detect "
                         f"(looked for {', '.join(TEXT_FIELDS if missing == 'text' else LABEL_FIELDS)}); the first "
                         f"has the fields {', '.join(map(str, first_keys))}: name them with --text-field and "
                         "--label-field")  # fmt: skip
    if not texts:
        raise ValueError(f"{path}: no usable labelled record ({skipped.count} skipped, e.g. {skipped.examples[:3]}); "
                         f"looked for text field {text_field or TEXT_FIELDS!r} and label field "
                         f"{label_field or LABEL_FIELDS!r}; pass text_field= / label_field=")  # fmt: skip
    assert fields is not None
    _log_summary(path, fields, (text_field, label_field), labels, skipped)
    return Labelled(texts, labels, fields[0], fields[1], skipped)


def _log_summary(path: Path, fields: tuple[str, str], given: tuple[str | None, str | None], labels: list[Label],
                 skipped: Skipped) -> None:  # fmt: skip
    """What was read: the fields (and whether they were detected), the counts, and each label's count."""
    how = ["given" if g is not None else "detected" for g in given]
    counts = Counter(labels)
    log.info("%s: text field %r (%s), label field %r (%s); %d records read, %d kept, %d skipped; %d labels: %s",
             path, fields[0], how[0], fields[1], how[1], len(labels) + skipped.count, len(labels), skipped.count,
             len(counts), ", ".join(f"{y!r} ({counts[y]})" for y in label_vocab(labels)))  # fmt: skip
    if skipped.count:
        log.warning("%s: skipped %d records %s, e.g. %s", path, skipped.count, skipped.by_reason, skipped.examples[0])


def label_vocab(labels: Sequence[Label]) -> list[Label]:
    """The distinct labels in sorted order: class i of the head is label_vocab[i]."""
    return sorted(set(labels))  # type: ignore[type-var]


def stratified_split(labels: Sequence[Label], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), seeded, drawn class by class: a class of n examples puts
    round(n * val_fraction) of them (at least 1, at most n - 1) in the held-out part. A class of one example stays
    in training (logged)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1): the classifier is measured on held-out examples, "
                         f"got {val_fraction}")  # fmt: skip
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in label_vocab(labels):
        members = [i for i, y in enumerate(labels) if y == label]
        if len(members) == 1:
            log.warning("label %r has a single example: it is trained on but never measured", label)
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        perm = [members[int(j)] for j in rng.permutation(len(members))]
        val += perm[:n_val]
        train += perm[n_val:]
    return sorted(train), sorted(val)
