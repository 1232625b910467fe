"""The `lmforge` command itself: --version, and -v/--verbose accepted before or after any verb."""

import logging

import pytest
import torch
from typer.testing import CliRunner

from lmforge import __version__
from lmforge.cli import app


@pytest.fixture(autouse=True)
def _restore_logging():
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def test_version_names_lmforge_and_torch():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"lmforge {__version__} (torch {torch.__version__})\n"


@pytest.mark.parametrize("argv", [["-v", "report", "{dir}"], ["report", "{dir}", "-v"], ["report", "--verbose", "{dir}"]])
def test_verbose_before_or_after_the_verb(tmp_path, argv):
    logging.getLogger().setLevel(logging.INFO)
    result = CliRunner().invoke(app, [a.format(dir=tmp_path) for a in argv])
    assert result.exit_code == 1, result.output  # the verb ran (and refused an empty folder), not a usage error
    assert result.output.startswith(f"error: {tmp_path} is not a run directory")
    assert logging.getLogger().level == logging.DEBUG


def test_verbose_after_run_with_a_typo_still_blames_the_override():
    result = CliRunner().invoke(app, ["run", "train.schedul=linear", "-v"])
    assert result.exit_code == 2
    assert "override 'train.schedul=linear': unknown key 'train.schedul' (did you mean 'train.schedule'?)" in result.output


def test_lm_eval_keeps_its_own_dash_v(monkeypatch):
    import lmforge.eval.lm_eval_adapter as adapter

    seen = []
    monkeypatch.setattr(adapter, "main", lambda args: seen.append(args))
    logging.getLogger().setLevel(logging.INFO)
    result = CliRunner().invoke(app, ["lm-eval", "--model", "lmforge", "-v", "DEBUG"])
    assert result.exit_code == 0, result.output
    assert seen == [["--model", "lmforge", "-v", "DEBUG"]]
    assert logging.getLogger().level == logging.INFO
