"""The sharded curate stage: same output for any worker count and executor, kill-safe reruns, boilerplate, formats."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.data.boilerplate import BoilerplateRemover, LineCounter, frequent_lines
from lmforge.data.curate import plan_shards, run_curate
from lmforge.data.curated import iter_split_records, part_files
from lmforge.data.executor import resolve_workers, run_tasks
from lmforge.data.readers import stdlib_root
from lmforge.data.config import DataConfig

EMAIL_PKG = stdlib_root() / "email"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file's bytes, by path relative to `out`."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "histograms.png"}  # fmt: skip


def _email_cfg(**kw) -> DataConfig:
    # Small shards so the package's ~40 files make many tasks; near dedup exercises the ordered decide step.
    # One worker unless a test asks for more: starting a process pool costs more than this small input.
    kw.setdefault("workers", 1)
    kw.setdefault("extensions", [".py"])  # the package's code, not its architecture.rst
    return DataConfig(source=str(EMAIL_PKG), shard_bytes=40_000, near_dedup=True, val_fraction=0.2, plots=False,
                      **kw)  # fmt: skip


def test_plan_groups_sorted_files_into_shards_of_about_shard_bytes():
    shards = plan_shards(_email_cfg())
    files = [rel for s in shards for _, rel in s["files"]]
    assert files == sorted(p.relative_to(EMAIL_PKG).as_posix() for p in EMAIL_PKG.rglob("*.py")
                           if "__pycache__" not in p.parts)  # fmt: skip
    assert [s["index"] for s in shards] == list(range(len(shards)))
    assert len(shards) >= 5
    for s in shards[:-1]:  # every shard but the last reaches the target, and drops below it without its last file
        sizes = [Path(p).stat().st_size for p, _ in s["files"]]
        assert sum(sizes) >= 40_000 > sum(sizes[:-1])
    single = plan_shards(DataConfig(source=str(EMAIL_PKG / "utils.py")))
    assert single == [{"index": 0, "whole": str(EMAIL_PKG / "utils.py")}]


def test_output_does_not_depend_on_the_worker_count(tmp_path):
    one = run_curate(_email_cfg(workers=1), tmp_path / "one")
    two = run_curate(_email_cfg(workers=2), tmp_path / "two")
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")
    assert {k: v for k, v in one.items() if "second" not in k and k != "docs_per_s"} == \
        {k: v for k, v in two.items() if "second" not in k and k != "docs_per_s"}  # fmt: skip
    parts = part_files(tmp_path / "one" / "train")
    assert [p.name for p in parts] == [f"part-{i:05d}.jsonl.zst" for i in range(one["shards"])]
    assert not (tmp_path / "one" / "work").exists()  # intermediate files are gone once stats.json is written


def test_ray_executor_gives_the_same_output(tmp_path):
    pytest.importorskip("ray")
    run_curate(_email_cfg(workers=1), tmp_path / "local")
    run_curate(_email_cfg(workers=2, executor="ray"), tmp_path / "ray")
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "ray")


def _square(x: int) -> int:
    return x * x


def test_run_tasks_returns_results_in_task_order_and_reports_each():
    seen = []
    assert run_tasks(_square, [3, 1, 2], workers=2, on_result=lambda i, r: seen.append((i, r))) == [9, 1, 4]
    assert sorted(seen) == [(0, 9), (1, 1), (2, 4)]
    assert resolve_workers(3) == 3 and resolve_workers(0) >= 1
    with pytest.raises(ValueError, match="executor"):
        run_tasks(_square, [1], executor="spark")


_CURATE_SCRIPT = """
import sys
from lmforge.data.curate import run_curate
from lmforge.data.config import DataConfig
cfg = DataConfig(source=sys.argv[1], shard_bytes=20_000, near_dedup=True, val_fraction=0.2, plots=False, workers=1)
run_curate(cfg, sys.argv[2])
"""


def _kill_when(path_glob: str, out: Path, source: Path) -> bool:
    """Start curation in a subprocess, SIGKILL it as soon as a file matching `path_glob` appears; True if killed."""
    proc = subprocess.Popen([sys.executable, "-c", _CURATE_SCRIPT, str(source), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if next(out.glob(path_glob), None) is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("kill_at", ["work/map/00002.json", "work/sign/00001.json", "work/write/00003.json"])
def test_sigkill_then_rerun_gives_byte_identical_output(tmp_path, kill_at):
    source = tmp_path / "src"  # the email package plus exact and near copies of some modules
    for path in sorted(EMAIL_PKG.glob("*.py")):
        (source / "pkg").mkdir(parents=True, exist_ok=True)
        (source / "pkg" / path.name).write_bytes(path.read_bytes())
    for name in ("utils.py", "message.py"):
        (source / "copies").mkdir(exist_ok=True)
        (source / "copies" / name).write_bytes((EMAIL_PKG / name).read_bytes())
        (source / "copies" / f"edited_{name}").write_bytes((EMAIL_PKG / name).read_bytes() + b"\n# edited\n")
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-c", _CURATE_SCRIPT, str(source), str(clean)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    killed = tmp_path / "killed"
    assert _kill_when(kill_at, killed, source), f"the run finished before {kill_at} appeared"
    assert not (killed / "stats.json").exists()
    subprocess.run([sys.executable, "-c", _CURATE_SCRIPT, str(source), str(killed)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    assert _outputs(killed) == _outputs(clean)
    stats = json.loads((clean / "stats.json").read_text())
    assert stats["removed"]["duplicate"]["docs"] == 2 and stats["removed"]["near duplicate"]["docs"] == 2


def test_changed_settings_start_afresh_instead_of_mixing_runs(tmp_path):
    run_curate(_email_cfg(), tmp_path)
    (tmp_path / "work" / "map").mkdir(parents=True)
    (tmp_path / "work" / "plan.json").write_text('{"stale": true}')  # a leftover of another run's plan
    (tmp_path / "train" / "part-00099.jsonl.zst").write_bytes(b"stale")
    again = run_curate(_email_cfg(min_chars=5000), tmp_path)
    assert [p.name for p in part_files(tmp_path / "train")] == [f"part-{i:05d}.jsonl.zst"
                                                                  for i in range(again["shards"])]  # fmt: skip
    kept = [r for s in ("train", "val") for r in iter_split_records(tmp_path, s)]
    assert len(kept) == again["docs_kept"] and all(len(r["text"]) >= 5000 for r in kept)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_output_formats_hold_the_same_records(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    run_curate(_email_cfg(), tmp_path / "zst")
    run_curate(_email_cfg(output_format=fmt), tmp_path / fmt)
    for split in ("train", "val"):
        assert list(iter_split_records(tmp_path / fmt, split)) == list(iter_split_records(tmp_path / "zst", split))
        assert all(p.name.endswith(f".{fmt}") for p in part_files(tmp_path / fmt / split))


# -- boilerplate ---------------------------------------------------------------------------------------------------


def test_line_counts_are_document_frequencies_and_merge_across_shards():
    a, b = LineCounter(), LineCounter()
    a.add("Cookie notice: we use cookies here\nfirst body line is here\nCookie notice: we use cookies here\n", 10)
    a.add("  cookie NOTICE: we use cookies here  \nshort\n", 10)
    b.add("Cookie notice: we use cookies here\nanother body line here\n", 10)
    frequent = frequent_lines([a.to_arrays(), b.to_arrays()], min_docs=3)
    assert len(frequent) == 1  # only the notice is in three documents; "short" is under min_chars
    assert len(frequent_lines([a.to_arrays()], min_docs=3)) == 0  # two documents in one shard are not enough
    copies = LineCounter()  # one page copied three times is one document, not three
    for _ in range(3):
        copies.add("Cookie notice: we use cookies here\nthe same body text\n", 10)
    assert len(frequent_lines([copies.to_arrays(), b.to_arrays()], min_docs=3)) == 0
    remover = BoilerplateRemover(frequent, 10)
    assert remover.strip("Cookie notice: we use cookies here\nthe article\n") == ("the article\n", 1)
    assert remover.strip("the article\nCOOKIE NOTICE: WE USE COOKIES HERE") == ("the article", 1)
    assert remover.strip("nothing to remove\n") == ("nothing to remove\n", 0)


def test_curate_removes_boilerplate_lines_and_drops_pages_made_only_of_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # Real prose bodies: the module docstrings of stdlib modules, each page wrapped in the same site furniture.
    modules = ["json/__init__.py", "email/utils.py", "textwrap.py", "difflib.py", "pprint.py", "shlex.py"]
    nav = "Home | News | Sport | Weather | Contact us"
    footer = "Copyright 2024 Example Media. All rights reserved."
    for i, mod in enumerate(modules):
        doc = (stdlib_root() / mod).read_text(encoding="utf-8").split('"""')[1]
        (src / f"page{i}.txt").write_text(f"{nav}\n{doc.strip()}\n{footer}\n", encoding="utf-8")
    (src / "page9.txt").write_text(f"{nav}\n{footer}\n{nav}\n", encoding="utf-8")  # nothing but furniture
    out = tmp_path / "out"
    cfg = DataConfig(source=str(src), extensions=[".txt"], boilerplate=True, boilerplate_min_docs=5, min_chars=0,
                     plots=False)  # fmt: skip
    metrics = run_curate(cfg, out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["boilerplate_lines"] == 2
    assert stats["removed"]["boilerplate only"]["docs"] == 1
    assert stats["removed"]["boilerplate only"]["examples"][0]["id"] == "page9.txt"
    assert stats["modified"]["boilerplate"]["docs"] == 6
    assert stats["modified"]["boilerplate"]["lines"] == 12
    texts = {r["id"]: r["text"] for s in ("train", "val") for r in iter_split_records(out, s)}
    assert sorted(texts) == [f"page{i}.txt" for i in range(6)] and metrics["docs_kept"] == 6
    for text in texts.values():
        assert nav not in text and footer not in text and text.endswith("\n") and not text.startswith("\n")


# -- the web pipeline on real pages --------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED / "web").exists(), reason=f"real web data not found under {SHARED}")
# The web recipe's names and addresses (spaCy, about 14 pages/s per core) take minutes over the whole folder: that
# run is slow; the default one switches them off and checks every other step of the recipe.
@pytest.mark.parametrize(
    "ner", [pytest.param(False, id="ner-off"), pytest.param(True, id="ner-on", marks=pytest.mark.slow)]
)
def test_cli_curates_real_warc_html_and_jsonl_with_the_web_recipe(tmp_path, ner):
    from typer.testing import CliRunner

    from lmforge.cli import app

    out = tmp_path / "out"
    overrides = [] if ner else ["data.pii_ner=[]"]
    result = CliRunner().invoke(app, ["curate", str(SHARED / "web"), "-o", str(out), "--recipe", "web",
                                      "--workers", "2", f"data.decontaminate=['{SHARED / 'eval'}']",
                                      *overrides])  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    removed = sum(e["docs"] for e in stats["removed"].values())
    assert stats["docs_in"] == stats["docs_kept"] + removed  # every document is kept or removed for a reason
    assert stats["docs_kept"] == stats["splits"]["train"]["docs"] + stats["splits"]["val"]["docs"]
    sources = {r["source"].split("/web/")[1].split("/")[0] for s in ("train", "val")
               for r in iter_split_records(out, s)}  # fmt: skip
    assert sources == {"cc_text", "cc_warc", "html", "wget_warc"}  # every input kind contributes clean text
    assert any(r.startswith("language: ") for r in stats["removed"])  # non-English pages are in the crawl
    assert stats["modified"]["boilerplate"]["lines"] > 0 and stats["pii_found"].get("EMAIL", 0) > 0
    assert (stats["pii_found"].get("PERSON", 0) > 0) == ner
    png = (out / "histograms.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
