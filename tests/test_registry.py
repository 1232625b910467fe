"""The stage registry: a stage declared in a test module, without editing any lmforge file, runs inside a recipe,
is skipped when up to date, re-runs when a setting changes (with the stage after it), resumes after a kill, gets
its settings validated like lmforge's own, and writes its own section of the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field

from lmforge import registry
from lmforge.pipeline import run_recipe, stage_config
from lmforge.recipe import RecipeError, validate_recipe
from lmforge.registry import ReportContext, Stage, StageContext, StageError
from lmforge.settings import Section


class CountConfig(Section):
    source: str = ""  # a text file
    min_len: int = Field(1, ge=1)  # words shorter than this are not counted
    crash_after: int = Field(0, ge=0)  # testing only: raise after this many lines (0: never)
    workers: int = 1  # how fast, not what: left out of the fingerprint

    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset({"workers", "crash_after"})


CALLS: list[dict] = []


def _count(ctx: StageContext) -> dict:
    """Counts words line by line into counts.jsonl, continuing after the lines a killed run already wrote."""
    cfg = ctx.settings.toy_count
    out = ctx.out / "counts.jsonl"
    done = out.read_text().splitlines() if out.exists() else []
    CALLS.append({"resumed_at": len(done)})
    lines = Path(cfg.source).read_text().splitlines()
    with out.open("a") as f:
        for i, line in enumerate(lines[len(done):], start=len(done)):
            if cfg.crash_after and i == cfg.crash_after:
                raise KeyboardInterrupt("killed")
            f.write(json.dumps({"line": i, "words": sum(len(w) >= cfg.min_len for w in line.split())}) + "\n")
    words = sum(json.loads(r)["words"] for r in out.read_text().splitlines())
    return {"lines": len(lines), "words": words}


def _total(ctx: StageContext) -> dict:
    counts = [json.loads(r) for r in ctx.input("counts").read_text().splitlines()]
    return {"total": sum(c["words"] for c in counts)}


def _report(ctx: ReportContext) -> list[str]:
    return ["## Word count", "", f"- {ctx.metrics['words']} words on {ctx.metrics['lines']} lines", ""]


COUNT = Stage(name="toy_count", order=15, run=_count, sections={"toy_count": CountConfig},
              sources=lambda s: {"text": Path(s.toy_count.source).read_text()}, produces={"counts": "counts.jsonl"},
              report=_report, default=False)  # fmt: skip
TOTAL = Stage(name="toy_total", order=16, run=_total, needs=("counts",), produces={"total": "manifest.json"},
              default=False)  # fmt: skip


@pytest.fixture
def toy(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("a bb ccc\ndddd e\nff ggg hhhh iiiii\n")
    CALLS.clear()
    with registry.registered(COUNT, TOTAL):
        yield tmp_path, text


def _recipe(tmp_path: Path, text: Path, *overrides: str, stages=("toy_count", "toy_total", "report")):
    return validate_recipe({"name": "toy", "run_dir": str(tmp_path / "runs"), "stages": list(stages),
                            "toy_count": {"source": str(text)}}, overrides=list(overrides))  # fmt: skip


def _actions(outcomes) -> dict[str, str]:
    return {o.stage: o.action for o in outcomes}


def test_a_stage_registered_from_a_test_runs_skips_reruns_and_reports(toy):
    tmp_path, text = toy
    first = run_recipe(_recipe(tmp_path, text))
    assert _actions(first) == {"toy_count": "ran", "toy_total": "ran", "report": "ran"}
    assert first[0].metrics == {"lines": 3, "words": 9} and first[1].metrics == {"total": 9}
    run = tmp_path / "runs" / "toy"
    # Its section lands in the run's recipe.yaml and its part in the report, after the stage table.
    assert "toy_count:\n  source:" in (run / "recipe.yaml").read_text()
    report = (run / "report.md").read_text()
    assert "## Word count\n\n- 9 words on 3 lines" in report and "| toy_count | done |" in report

    assert _actions(run_recipe(_recipe(tmp_path, text))) == {"toy_count": "skipped", "toy_total": "skipped",
                                                            "report": "skipped"}  # fmt: skip
    # A setting outside the fingerprint changes nothing; one inside re-runs the stage and the one reading it.
    assert _actions(run_recipe(_recipe(tmp_path, text, "toy_count.workers=4")))["toy_count"] == "skipped"
    changed = run_recipe(_recipe(tmp_path, text, "toy_count.min_len=3"))
    assert _actions(changed) == {"toy_count": "re-ran", "toy_total": "re-ran", "report": "re-ran"}
    assert changed[1].metrics == {"total": 5}
    # So does a changed source file (the stage's `sources`).
    text.write_text("one two\n")
    assert _actions(run_recipe(_recipe(tmp_path, text, "toy_count.min_len=3")))["toy_count"] == "re-ran"


def test_a_registered_stage_resumes_after_a_kill(toy):
    tmp_path, text = toy
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(tmp_path, text, "toy_count.crash_after=2", stages=("toy_count",)))
    manifest = json.loads((tmp_path / "runs" / "toy" / "toy_count" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == "KeyboardInterrupt: killed"
    outcomes = run_recipe(_recipe(tmp_path, text, stages=("toy_count",)))
    assert _actions(outcomes) == {"toy_count": "resumed"}
    assert CALLS == [{"resumed_at": 0}, {"resumed_at": 2}], "the second call continued after the two lines written"
    assert outcomes[0].metrics == {"lines": 3, "words": 9}


def test_a_registered_stages_settings_are_checked_like_lmforges_own(toy):
    tmp_path, text = toy
    with pytest.raises(RecipeError) as e:
        _recipe(tmp_path, text, "toy_count.min_lenn=2")
    assert "unknown key 'toy_count.min_lenn' (did you mean 'toy_count.min_len'?)" in str(e.value)
    with pytest.raises(RecipeError, match=r"toy_count.min_len = 0: Input should be greater than or equal to 1"):
        _recipe(tmp_path, text, "toy_count.min_len=0")
    with pytest.raises(RecipeError, match=r"stages must be in lifecycle order"):
        _recipe(tmp_path, text, stages=("toy_total", "toy_count"))
    # The fingerprint covers its own section's settings, less the non-semantic ones.
    assert stage_config(_recipe(tmp_path, text), "toy_count") == {"source": str(text), "min_len": 1}


def test_registry_refuses_conflicts_and_unfed_stages():
    with registry.registered(COUNT):
        with pytest.raises(StageError, match="a stage named 'toy_count' is already registered"):
            registry.register(COUNT)
        with pytest.raises(StageError, match="stage 'other' takes order 15, which stage 'toy_count' already has"):
            registry.register(Stage(name="other", order=15, run=_total))
        clash = Stage(name="other", order=99, run=_total, sections={"toy_count": CountConfig})
        with pytest.raises(StageError, match=r"declares section\(s\) \['toy_count'\], which stage 'toy_count' "
                                             r"already owns"):  # fmt: skip
            registry.register(clash)
    assert "toy_count" not in registry.names()
    with pytest.raises(RecipeError, match="unknown key 'toy_count'"):
        validate_recipe({"toy_count": {}})
    lonely = Stage(name="lonely", order=1, run=_total, needs=("counts",))
    with registry.registered(lonely):
        with pytest.raises(StageError, match="stage 'lonely' needs the artifact 'counts', and no stage before it "
                                             "produces one"):  # fmt: skip
            registry.upstream(lonely, ["lonely"])
    with pytest.raises(StageError, match=r"no stage named 'nope'; stages: curate, tokenizer, shards, pretrain, import, "
                                         r"sft, cai, pairs, judge, reward, dpo, ppo, grpo, eval, export, report"):  # fmt: skip
        registry.get("nope")


def test_artifacts_come_from_the_latest_producer_in_the_recipe():
    export, ev = registry.get("export"), registry.get("eval")
    assert registry.upstream(export, ["pretrain", "sft", "export"]) == ["sft"]
    assert registry.upstream(export, ["pretrain", "export"]) == ["pretrain"]
    assert registry.upstream(export, ["export"]) == ["pretrain"], "with no producer in the recipe: the first one"
    assert registry.upstream(ev, ["pretrain", "sft", "eval"]) == ["pretrain", "curate"], "eval reads the base model"
    assert registry.upstream(ev, ["import", "sft", "eval"]) == ["import", "curate"]
    assert registry.upstream(export, ["import", "sft", "export"]) == ["sft"]
    assert registry.upstream(export, ["import", "export"]) == ["import"]
    paths = registry.artifact_paths(export, ["sft", "export"], Path("/r"))
    assert paths == {"model": Path("/r/sft/final")}


def test_an_optional_need_is_read_only_from_a_stage_of_the_recipe():
    reader = Stage(name="toy_reader", order=17, run=_total, needs=("counts", "total?"), default=False)
    with registry.registered(COUNT, TOTAL, reader):
        assert registry.upstream(reader, ["toy_count", "toy_total", "toy_reader"]) == ["toy_count", "toy_total"]
        assert registry.upstream(reader, ["toy_count", "toy_reader"]) == ["toy_count"]
        assert registry.artifact_paths(reader, ["toy_count", "toy_total", "toy_reader"], Path("/r")) == {
            "counts": Path("/r/toy_count/counts.jsonl"), "total": Path("/r/toy_total/manifest.json")}
        assert registry.artifact_paths(reader, ["toy_reader"], Path("/r")) == {
            "counts": Path("/r/toy_count/counts.jsonl")}, "a plain need falls back to the first producer"
    # The reward and dpo stages train on the labels of a judge or cai stage when the recipe has one.
    for name in ("reward", "dpo"):
        assert "preferences?" in registry.get(name).needs


SPINE = ("pipeline.py", "recipe.py", "registry.py", "runs.py", "verbs.py", "cli.py", "outdir.py", "report/report.py")


def _string_constants(path: Path) -> set[str]:
    import ast

    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}  # fmt: skip


def test_the_spine_names_no_stage():
    """The runner, the recipe schema, the report and the CLI learn the stages from the registry: none of them
    writes a stage's name (the report module declares only its own stage)."""
    src = Path(registry.__file__).parent
    found = {}
    for rel in SPINE:
        own = {"report"} if rel == "report/report.py" else set()
        named = (_string_constants(src / rel) & set(registry.names())) - own
        if named:
            found[rel] = sorted(named)
    assert found == {}
    # The check sees a stage name where one is written.
    assert "report" in _string_constants(src / "report/report.py")


def test_the_settings_reference_is_current():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "settings_reference.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_worked_example_in_the_architecture_page_runs(tmp_path):
    """docs/architecture.md's "Adding a stage" example, run as written inside a recipe."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n# src/lmforge/data/wordcount.py\n(.*?)```", doc, re.S).group(1)
    declared: list[Stage] = []
    namespace = {"__name__": "wordcount_example"}
    exec(compile(code.replace("register(Stage(", "declared.append(Stage(", 1), "wordcount.py", "exec"),
         {**namespace, "declared": declared})  # fmt: skip
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("the cat sat on the mat " * 20)
    (tmp_path / "src" / "b.txt").write_text("a dog ran far away " * 20)
    with registry.registered(*declared):
        recipe = validate_recipe({"name": "wc", "run_dir": str(tmp_path / "runs"), "stages": ["curate", "wordcount",
                                  "report"], "data": {"source": str(tmp_path / "src"), "val_fraction": 0.5,
                                  "plots": False}, "wordcount": {"min_len": 3}})  # fmt: skip
        outcomes = run_recipe(recipe)
    words = outcomes[1].metrics["words"]
    # One file is trained on, the other held out: 5 or 4 words of 3+ letters, 20 times.
    assert outcomes[1].stage == "wordcount" and words in (20 * 5, 20 * 4), outcomes[1].metrics
    assert f"- {words:,} words in the training split" in (tmp_path / "runs" / "wc" / "report.md").read_text()


def test_a_registered_stage_brings_its_verb(toy, tmp_path):
    """A stage's `verb` becomes `lmforge NAME`, calling the stage's own function on paths from the command line."""
    import typer
    from typer.testing import CliRunner

    from lmforge import cli, verbs

    def toy_verb(source: Path = typer.Argument(...), out: Path = typer.Option(..., "-o"),
                 overrides: list[str] = typer.Argument(None)) -> None:  # fmt: skip
        """Count the words of a text file."""
        cfg = verbs.settings([*(overrides or []), f"toy_count.source={source}"], {"toy_count"})
        with verbs.claimed(out, "toy_count"):
            metrics = verbs.run_stage(with_verb, cfg, out)
        typer.echo(f"words={metrics['words']}")

    with_verb = Stage(**{**COUNT.__dict__, "name": "toy_verb_count", "order": 14, "sections": {}, "verb": toy_verb})
    _, text = toy
    with registry.registered(with_verb):
        cli.add_stage_verbs()
        try:
            result = CliRunner().invoke(cli.app, ["toy_verb_count", str(text), "-o", str(tmp_path / "o"),
                                                  "toy_count.min_len=3"])  # fmt: skip
            assert result.exit_code == 0, result.output
            assert "words=5" in result.output and (tmp_path / "o" / "counts.jsonl").is_file()
            bad = CliRunner().invoke(cli.app, ["toy_verb_count", str(text), "-o", str(tmp_path / "p"), "model.x=1"])
            assert bad.exit_code == 2 and "this command takes settings under ['toy_count']" in bad.output
        finally:
            cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.name != "toy_verb_count"]
