"""Settings of the data stages: `data` (the curate stage, docs/curation.md) and `shards`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lmforge.data.files import DEFAULT_EXTENSIONS
from lmforge.settings import Section


class DataConfig(Section):
    # "stdlib" = the .py files of the running interpreter's standard library; otherwise a file or directory of
    # text, code, .jsonl / .csv / .parquet records, WARC or HTML files (docs/curation.md).
    source: str = "stdlib"
    text_field: str = "text"  # key (.jsonl) or column (.csv / .parquet) holding the text of a record
    # Plain text: one document per file, or per blank-line block (a block over max_chars: per line); auto = per
    # file, but per block for a file that is not code and is longer than max_chars.
    text_split: Literal["auto", "file", "paragraph"] = "auto"
    # Used when the source is a directory; files with other extensions are skipped and counted in stats.json.
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    follow_symlinks: bool = False  # read links whose target is outside the source directory
    include_tests: bool = True  # stdlib only: whether Lib/test/ and friends are part of the corpus
    # Share of files held out, chosen by a hash of the path; 0 = no held-out split (stages that need one say so).
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    min_chars: int = Field(64, ge=0)
    max_chars: int = Field(200_000, gt=0)
    max_line_chars: int = Field(1000, gt=0)  # longer lines mark minified or generated files
    min_alnum_fraction: float = Field(0.25, ge=0.0, le=1.0)
    # Which documents the code rules (generated notice, max_line_chars, min_alnum_fraction) judge: those from code
    # files (by extension; prose has long lines), all of them, or none.
    code_rules: Literal["code_files", "all", "none"] = "code_files"
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    fix_mojibake: bool = True  # ftfy repair of mis-decoded text; code recipes turn it off to keep literals verbatim
    strip_license_headers: bool = False  # drop a leading licence comment block from code files
    languages: list[str] = Field(default_factory=list)  # keep only these languages (ISO 639-1); empty = no filter
    language_min_confidence: float = Field(0.65, ge=0.0, le=1.0)
    toxicity: bool = False  # word-boundary, leetspeak-aware lexicon filter (lmforge.data.toxicity)
    toxicity_word_lists: list[str] = Field(default_factory=list)  # lists replacing better-profanity's (e.g. LDNOOBW)
    toxicity_max_ratio: float = Field(0.01, ge=0.0, le=1.0)  # share of words that may match
    dedup: bool = True
    # Heuristic web-text rules, applied in the order given (see lmforge.data.quality).
    quality: list[Literal["gopher_quality", "gopher_repetition", "c4", "fineweb"]] = Field(default_factory=list)
    pii: bool = False  # replace e-mails, phones, IPs, cards, IBANs, SSNs and secrets with typed placeholders
    # With pii: also these named-entity kinds, found by a spaCy model and context rules (lmforge.data.pii_ner;
    # pip install 'lmforge[ner]'). Empty = off: the model costs ~100x the patterns' time (docs/curation.md).
    pii_ner: list[Literal["PERSON", "ORG", "ADDRESS"]] = Field(default_factory=list)
    # Classic NLP preprocessing, off for language models (docs/curation.md), run before deduplication:
    spell_correct: bool = False  # fix misspelt English words (symspellpy's dictionary, ~4 s to load per worker)
    remove_stop_words: bool = False  # delete spaCy's English stop words
    lowercase: bool = False  # lower-case every document
    near_dedup: bool = False  # MinHash LSH near-duplicate removal (see lmforge.data.minhash)
    near_dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)  # estimated Jaccard of word n-grams
    minhash_bands: int = Field(14, gt=0)
    minhash_rows: int = Field(8, gt=0)
    shingle_words: int = Field(5, gt=0)
    decontaminate: list[str] = Field(default_factory=list)  # evaluation files whose n-grams must not leak in
    decontam_ngram: int = Field(13, gt=0)
    decontam_mode: Literal["drop", "flag"] = "drop"
    # Lines found in at least boilerplate_min_docs documents are deleted from all of them (lmforge.data.boilerplate).
    boilerplate: bool = False
    boilerplate_min_docs: int = Field(10, ge=2)
    boilerplate_min_chars: int = Field(20, ge=1)  # shorter lines are never counted as boilerplate
    max_docs: int | None = Field(None, gt=0)  # cap on documents kept, in input order, for quick experiments
    hf_split: str | None = None  # a dataset saved with HF datasets' save_to_disk: the split to read; None = all
    # Execution: input files are grouped into shards of about shard_bytes, processed in parallel; output part
    # files follow the shards, so the output does not depend on workers or executor.
    output_format: Literal["jsonl.zst", "jsonl", "parquet"] = "jsonl.zst"
    shard_bytes: int = Field(4_000_000, gt=0)
    workers: int = Field(0, ge=0)  # 0 = all cores
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # ray executor: cluster address for ray.init; None starts a local Ray
    plots: bool = True  # before/after histograms of length and quality signals (histograms.png)

    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset({"workers", "executor", "ray_address", "plots"})

    @model_validator(mode="after")
    def _ner_needs_pii(self) -> "DataConfig":
        if self.pii_ner and not self.pii:
            raise ValueError(f"data.pii_ner={self.pii_ner} needs data.pii=true (the entities are part of PII "
                             "redaction); set pii: true or pii_ner: []")  # fmt: skip
        return self


class ShardsConfig(Section):
    shard_tokens: int = Field(50_000_000, gt=0)  # tokens per shard file
    workers: int = Field(0, ge=0)  # 0 = all cores

    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset({"workers"})
