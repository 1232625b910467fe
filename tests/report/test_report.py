"""The run report: built from the manifests alone, every number rendered as text or a table, never a raw dict; and
a folder that is not a run directory is refused instead of getting an empty report."""

import json

from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.report.report import existing_stages
from lmforge.report.report import build_report

CURATE = {"docs_in": 2000, "docs_kept": 1500, "docs_train": 1400, "docs_val": 100, "bytes_train": 1234567,
          "bytes_val": 8910, "docs_skipped_bad": 3, "removed_too_short": 300, "removed_gopher_duplicate_5_grams": 200,
          "removed_generated": 0}  # fmt: skip


def _stage(root, stage, metrics):
    (root / stage).mkdir(parents=True)
    manifest = {"stage": stage, "status": "done", "fingerprint": "f00d", "timings": {"seconds": 1.5}, "metrics": metrics}
    (root / stage / "manifest.json").write_text(json.dumps(manifest))


def test_removals_by_reason_are_a_table_and_counts_are_readable(tmp_path):
    _stage(tmp_path, "curate", CURATE)
    _stage(tmp_path, "pretrain", {"params": 1722048, "non_embedding_params": 1525440, "steps": 560, "tokens": 2293760})
    build_report(tmp_path, existing_stages(tmp_path), tmp_path / "report")
    text = (tmp_path / "report.md").read_text()
    assert ("- documents read: 2,000, kept: 1,500 (train 1,400, validation 100); bad records skipped: 3\n"
            "- bytes: train 1,234,567, validation 8,910\n\n"
            "| reason | documents removed | share of documents read |\n"
            "|---|---:|---:|\n"
            "| too short | 300 | 15.0% |\n"
            "| gopher duplicate 5 grams | 200 | 10.0% |\n\n") in text  # fmt: skip
    assert "- parameters: 1,722,048 (1,525,440 non-embedding)\n- steps: 560, tokens: 2,293,760" in text
    assert "{" not in text and "[" not in text, "no dict or list is printed raw"


def test_a_curation_that_removed_nothing_says_so(tmp_path):
    _stage(tmp_path, "curate", {k: v for k, v in CURATE.items() if not k.startswith("removed_")})
    build_report(tmp_path, existing_stages(tmp_path), tmp_path / "report")
    assert "\nNo document was removed.\n" in (tmp_path / "report.md").read_text()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "curate").mkdir()  # a stage folder without a manifest is not a stage that ran
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == (
        f"error: {tmp_path} is not a run directory: a run directory, made by `lmforge run`, holds a recipe.yaml and "
        "a folder per stage (curate/, tokenizer/, shards/, pretrain/, ...) with a manifest.json, and there is no "
        "stage there to report on\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curate", "notes.txt"], "nothing is written"
    _stage(tmp_path, "tokenizer", {"vocab_size": 512, "bytes_per_token": 2.5})
    assert CliRunner().invoke(app, ["report", str(tmp_path)]).exit_code == 0
    assert "- vocabulary: 512 tokens; 2.500 bytes per token" in (tmp_path / "report.md").read_text()
