"""The whole recipe end to end on a small slice of real data: stages run, skip, re-run downstream, and report."""

import json
import re
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.pipeline import RunDirError, run_recipe
from lmforge.recipe import load_recipe

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = [
    f"data.source={STDLIB / 'json'}",
    "data.val_fraction=0.3",
    "tokenizer.vocab_size=512",
    "model.depth=1",
    "model.d_model=64",
    "model.max_seq_len=64",
    "train.seq_len=64",
    "train.batch_size=4",
    "train.max_steps=6",
    "train.compile=false",  # compiling a tiny model costs more than its six steps
    "train.warmup_steps=2",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.ckpt_every=3",
    "eval.samples=1",
    "eval.sample_tokens=8",
    # The default recipe's stages but sft: its pairs do not fit 64-token rows (tests/finetune/test_sft_stage.py
    # runs it).
    "stages=[curate, tokenizer, shards, pretrain, eval, export, report]",
]


def _recipe(tmp_path, *extra):
    return load_recipe(None, TINY + [f"run_dir={tmp_path}", "name=tiny", *extra])


def _actions(outcomes):
    return {o.stage: o.action for o in outcomes}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    outcomes = run_recipe(_recipe(tmp))
    return tmp, outcomes


def test_every_stage_runs_and_leaves_a_manifest(finished_run):
    tmp, outcomes = finished_run
    assert _actions(outcomes) == {s: "ran" for s in ("curate", "tokenizer", "shards", "pretrain", "eval", "export",
                                                     "report")}  # fmt: skip
    root = tmp / "tiny"
    for stage in _actions(outcomes):
        m = json.loads((root / stage / "manifest.json").read_text())
        assert m["status"] == "done" and m["fingerprint"] and m["timings"]["seconds"] >= 0
    ev = json.loads((root / "eval" / "manifest.json").read_text())["metrics"]
    assert {"val_loss", "val_bpb", "xz_bpb"} <= set(ev) and ev["val_bpb"] > 0 and ev["xz_bpb"] > 0
    pre = json.loads((root / "pretrain" / "manifest.json").read_text())["metrics"]
    assert {"tokens_per_s", "mfu", "peak_flops"} <= set(pre) and pre["steps"] == 6
    assert (root / "pretrain" / "final" / "model.safetensors").exists()
    assert (root / "export" / "hf" / "config.json").exists()
    report = (root / "report.md").read_text()
    assert "bits per byte" in report and "xz -9e" in report and "## Samples" in report
    assert (root / "report" / "loss.png").stat().st_size > 1000


def test_rerun_skips_everything(finished_run):
    tmp, _ = finished_run
    assert set(_actions(run_recipe(_recipe(tmp))).values()) == {"skipped"}


def test_changed_setting_reruns_that_stage_and_downstream_only(finished_run):
    tmp, _ = finished_run
    actions = _actions(run_recipe(_recipe(tmp, "train.max_steps=8")))
    assert actions == {"curate": "skipped", "tokenizer": "skipped", "shards": "skipped", "pretrain": "re-ran",
                       "eval": "re-ran", "export": "re-ran", "report": "re-ran"}  # fmt: skip
    # a setting that changes only speed or bookkeeping does not invalidate anything
    assert set(_actions(run_recipe(_recipe(tmp, "train.max_steps=8", "train.keep_last=5"))).values()) == {"skipped"}
    actions = _actions(run_recipe(_recipe(tmp, "train.max_steps=8", "eval.sample_tokens=4")))
    assert actions["pretrain"] == "skipped" and actions["eval"] == "re-ran" and actions["export"] == "skipped"


def test_a_stage_whose_inputs_are_missing_says_which(tmp_path):
    with pytest.raises(RuntimeError, match=r"stage 'pretrain' reads the output of 'shards', which has not finished"):
        run_recipe(_recipe(tmp_path, "stages=[pretrain]"))


def test_cli_help_and_validation_errors():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("run", "curate", "tokenizer", "pretrain", "eval", "generate", "export", "report"):
        assert verb in result.output
    result = runner.invoke(app, ["run", "train.max_step=3"])
    assert result.exit_code == 2 and "unknown key 'train.max_step'" in result.output
    result = runner.invoke(app, ["pretrain", "x", "-t", "y", "-o", "z", "data.source=q"])
    assert result.exit_code == 2 and "takes settings under ['model', 'parallel', 'pretrain', 'train']" in result.output


def test_cli_generate_and_eval_on_the_trained_checkpoint(finished_run):
    tmp, _ = finished_run
    ckpt = tmp / "tiny" / "pretrain" / "final"
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(ckpt), "--prompt", "def ", "-n", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def ")
    out = tmp / "cli-eval"
    result = runner.invoke(app, ["eval", str(ckpt), "--text", str(tmp / "tiny" / "curate" / "val"), "-o",
                                 str(out), "eval.samples=0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    cli = json.loads((out / "results.json").read_text())["metrics"]
    stage = json.loads((tmp / "tiny" / "eval" / "manifest.json").read_text())["metrics"]
    assert cli["val_bpb"] == pytest.approx(stage["val_bpb"], rel=1e-9)


def test_exported_trained_model_matches_in_transformers(finished_run):
    transformers = pytest.importorskip("transformers", reason="transformers is needed to load the export")
    import torch

    from lmforge.model.io import load_checkpoint_tokenizer, load_model

    root = finished_run[0] / "tiny"
    model, _ = load_model(root / "pretrain" / "final")
    tok = load_checkpoint_tokenizer(root / "pretrain" / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "export" / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "export" / "hf")
    text = (STDLIB / "json" / "scanner.py").read_text()[:400]
    ids = [tok.bos_id] + tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids  # the exported tokenizer adds BOS like training did
    x = torch.tensor([ids[:64]])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


SHARED_C4 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "web" / "cc_text" / "llamafactory_c4_demo.jsonl"


@pytest.mark.skipif(not SHARED_C4.exists(), reason=f"real web text not found at {SHARED_C4} (the shared data folder)")
def test_own_jsonl_corpus_runs_end_to_end(tmp_path):
    """A user's JSONL web text instead of the stdlib: 300 real C4 documents, every record accounted for."""
    overrides = [o for o in TINY if not o.startswith(("data.source", "data.val_fraction"))]
    recipe = load_recipe(None, overrides + [f"data.source={SHARED_C4}", "data.val_fraction=0.1", f"run_dir={tmp_path}",
                                            "name=c4", "stages=[curate, tokenizer, shards, pretrain, eval]"])  # fmt: skip
    assert [o.action for o in run_recipe(recipe)] == ["ran"] * 5
    cur = json.loads((tmp_path / "c4" / "curate" / "manifest.json").read_text())["metrics"]
    removed = sum(v for k, v in cur.items() if k.startswith("removed_"))
    assert cur["docs_in"] == 300 == cur["docs_kept"] + removed + cur["docs_skipped_bad"]
    assert cur["docs_val"] > 0 and cur["docs_train"] + cur["docs_val"] == cur["docs_kept"]
    ev = json.loads((tmp_path / "c4" / "eval" / "manifest.json").read_text())["metrics"]
    assert ev["val_bytes"] == cur["bytes_val"], "every held-out byte is scored"


def test_no_val_split_and_a_time_budget_run_end_to_end_and_say_so(tmp_path):
    """data.val_fraction=0: no held-out split, and each stage that would read one says so; train.max_time: the
    report shows the budget and how much of it was used."""
    overrides = [o for o in TINY if not o.startswith(("data.val_fraction", "stages"))]
    recipe = load_recipe(None, overrides + ["data.val_fraction=0", "train.max_time=10m", "eval.code=[]",
                                            f"run_dir={tmp_path}", "name=noval",
                                            "stages=[curate, tokenizer, shards, pretrain, eval, report]"])
    assert [o.action for o in run_recipe(recipe)] == ["ran"] * 6
    root = tmp_path / "noval"
    metrics = {s: json.loads((root / s / "manifest.json").read_text())["metrics"]
               for s in ("curate", "tokenizer", "pretrain", "eval")}  # fmt: skip
    assert metrics["curate"]["docs_val"] == 0 and metrics["curate"]["docs_train"] == metrics["curate"]["docs_kept"]
    assert metrics["tokenizer"]["bytes_per_token_split"] == "train"
    pre = metrics["pretrain"]
    assert pre["val_split"] is False and pre["final_val_loss"] is None and pre["steps"] == 6
    assert pre["max_time"] == 600.0 and pre["stopped_by"] == "max_steps"
    assert metrics["eval"]["val_split"] is False and "val_bpb" not in metrics["eval"]
    report = (root / "report.md").read_text()
    assert "**No held-out bits per byte: the run has no val split (data.val_fraction=0).**" in report
    assert "validation loss none (no val split: data.val_fraction=0)" in report
    assert re.search(r"wall time [\d.]+ s of a 600 s budget \(train\.max_time, \d+% used; stopped by max_steps\)",
                     report)


def test_console_entry_turns_user_errors_into_one_line(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lmforge.cli", "eval", str(tmp_path / "nowhere"), "--text", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: checkpoint {tmp_path / 'nowhere'} does not exist (run with --verbose "
                                     "for the traceback)")  # fmt: skip


def test_a_run_directory_belongs_to_the_recipe_that_made_it(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    for f in (first, second):
        f.write_text(f"name: shared\nrun_dir: {tmp_path / 'runs'}\nstages: []\n")
    root = tmp_path / "runs" / "shared"
    run_recipe(load_recipe(str(first)))
    assert json.loads((root / "run.json").read_text()) == {"recipe": str(first.resolve()), "name": "shared"}
    run_recipe(load_recipe(str(first)))  # the same recipe again
    recorded = load_recipe(str(root / "recipe.yaml"))  # every setting the run used: it re-runs the run
    assert recorded.model_dump() == load_recipe(str(first)).model_dump()
    run_recipe(recorded)
    with pytest.raises(RunDirError) as e:
        run_recipe(load_recipe(str(second)))
    assert str(e.value) == (
        f"{root} holds the run of {first.resolve()}, and this is {second.resolve()}: running it there would "
        "overwrite that run's stages. Give this recipe a name of its own (name: in the file, or name=NEW on the "
        f"command line), or delete {root} to start over"
    )
    with pytest.raises(RunDirError, match=re.escape(f"holds the run of {first.resolve()}, and this is built-in "
                                                    "recipe stdlib-code:")):  # fmt: skip
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / 'runs'}", "name=shared", "stages=[]"]))
    notes = tmp_path / "runs" / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(RunDirError, match=f"^{re.escape(str(notes))} is not empty and is not a run directory"):
        run_recipe(load_recipe(str(first), ["name=notes"]))
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]


def test_cli_run_says_where_settings_come_from_and_refuses_another_recipes_run(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"run_dir: {tmp_path}\nstages: []\n")
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(mine)])
    assert result.exit_code == 0, result.output
    assert "settings it does not give take the defaults of each stage's schema" in " ".join(result.output.split())
    assert json.loads((tmp_path / "mine" / "run.json").read_text())["recipe"] == str(mine.resolve())
    result = runner.invoke(app, ["run", "name=mine", f"run_dir={tmp_path}", "stages=[]"])
    assert result.exit_code == 2 and f"error: {tmp_path / 'mine'} holds the run of {mine.resolve()}" in result.output
