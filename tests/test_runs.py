"""Manifests and the skip / re-run / resume decision."""

import json

import pytest

from lmforge.runs import files_fingerprint, fingerprint, read_manifest, run_stage


def _writer(calls, text="out"):
    def fn(out_dir):
        calls.append(out_dir)
        (out_dir / "result.txt").write_text(text)
        return {"n": len(calls)}

    return fn


def test_fingerprint_is_stable_and_order_independent():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({})) == 16


def test_files_fingerprint_tracks_size_and_mtime(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    fp1 = files_fingerprint([f], tmp_path)
    assert files_fingerprint([f], tmp_path) == fp1
    f.write_text("hello world")
    assert files_fingerprint([f], tmp_path) != fp1


def test_stage_runs_then_skips_then_reruns_on_change(tmp_path):
    calls = []
    d = tmp_path / "stage"
    o1 = run_stage("curate", d, {"x": 1}, {"source": "s1"}, _writer(calls))
    assert o1.action == "ran" and o1.metrics == {"n": 1}
    m = read_manifest(d)
    assert m["status"] == "done" and m["config"] == {"x": 1} and m["inputs"] == {"source": "s1"}
    assert m["outputs"] == [{"path": "result.txt", "bytes": 3}]
    assert m["metrics"] == {"n": 1} and m["timings"]["seconds"] >= 0 and m["timings"]["peak_rss_mb"] > 0

    o2 = run_stage("curate", d, {"x": 1}, {"source": "s1"}, _writer(calls))
    assert o2.action == "skipped" and o2.metrics == {"n": 1} and len(calls) == 1
    assert o2.fingerprint == o1.fingerprint

    (d / "stale.txt").write_text("left from the old config")
    o3 = run_stage("curate", d, {"x": 2}, {"source": "s1"}, _writer(calls))
    assert o3.action == "re-ran" and o3.fingerprint != o1.fingerprint
    assert not (d / "stale.txt").exists(), "a changed config must not reuse the old outputs"

    o4 = run_stage("curate", d, {"x": 2}, {"source": "s2"}, _writer(calls))
    assert o4.action == "re-ran"


def test_tampered_output_triggers_a_rerun(tmp_path):
    calls = []
    d = tmp_path / "stage"
    run_stage("s", d, {}, {}, _writer(calls))
    (d / "result.txt").write_text("changed by hand")
    assert run_stage("s", d, {}, {}, _writer(calls)).action == "resumed"
    assert len(calls) == 2


def test_failed_stage_is_marked_and_resumed_with_its_partial_outputs(tmp_path):
    d = tmp_path / "stage"

    def boom(out_dir):
        (out_dir / "partial.txt").write_text("half")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        run_stage("pretrain", d, {"a": 1}, {}, boom)
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == "RuntimeError: killed midway"

    seen = []

    def resume(out_dir):
        seen.append((out_dir / "partial.txt").read_text())
        return {}

    assert run_stage("pretrain", d, {"a": 1}, {}, resume).action == "resumed"
    assert seen == ["half"], "a resumed stage keeps what it had written"
    assert read_manifest(d)["status"] == "done"


def test_unreadable_manifest_means_run_again(tmp_path):
    d = tmp_path / "stage"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    assert read_manifest(d) is None
    assert run_stage("s", d, {}, {}, _writer([])).action == "ran"
