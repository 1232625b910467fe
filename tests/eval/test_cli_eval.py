"""`lmforge eval` command-line options (the scoring itself is tested in test_eval_*.py)."""

from __future__ import annotations

from typer.testing import CliRunner

from lmforge.cli import app


def test_limit_caps_benchmark_examples_and_code_problems(tmp_path, monkeypatch):
    import lmforge.eval.run

    seen = []

    def fake_evaluate(checkpoint, text, cfg, out, device, training_data=None):
        assert device == "auto", "the verb runs the eval stage's function with the default train.device"
        seen.append(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("| task |\n", encoding="utf-8")
        return {}

    monkeypatch.setattr(lmforge.eval.run, "evaluate_checkpoint", fake_evaluate)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.json").write_text("{}", encoding="utf-8")  # eval checks the path is a model first
    args = ["eval", str(tmp_path / "ckpt"), "--tasks", "arc_easy", "--task-dir", str(tmp_path), "--code", "stdlib",
            "-o", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--limit", "50"])
    assert result.exit_code == 0, result.output
    assert (seen[0].limit, seen[0].code_limit) == (50, 50)
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out2")])
    assert (seen[1].limit, seen[1].code_limit) == (None, None)  # no --limit: everything
    bad = CliRunner().invoke(app, [*args, "--limit", "0"])
    assert bad.exit_code == 2 and "--limit" in bad.output
