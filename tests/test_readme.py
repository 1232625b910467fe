"""Every command in the README's code blocks, run in order as a new user would, with small step counts.

Minutes long, so marked slow (`pytest -m slow tests/test_readme.py`). The README is parsed, not copied: a command
added to it is run here without editing this file, and a placeholder path this file does not know fails the test.
Commands the README shows failing (followed by `# error: ...` lines) must fail with the output shown.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# Appended to each verb so it finishes in seconds; a later `key=value` wins over the README's own.
SMALL_RUN = ["data.max_docs=150", "tokenizer.vocab_size=1024", "train.max_steps=6", "train.eval_every=3",
             "train.ckpt_every=3", "train.eval_batches=2", "train.compile=false", "sft.max_pairs=48",
             "sft.heldout_pairs=8", "sft.gen_prompts=2", "sft.gen_tokens=16", "sft.train.max_steps=3",
             "grpo.max_prompts=16", "grpo.heldout_size=2", "grpo.gen_tokens=16", "grpo.group_size=2",
             "grpo.max_new_tokens=8", "grpo.train.max_steps=2", "grpo.train.batch_size=2",
             "eval.code_limit=2", "eval.samples=1", "eval.sample_tokens=16", "eval.max_tokens=4096"]  # fmt: skip
SMALL = {
    "run": SMALL_RUN,
    "curate": ["data.max_docs=150"],
    "pretrain": ["train.max_steps=4", "train.eval_every=2", "train.ckpt_every=2", "train.eval_batches=2",
                 "train.compile=false"],  # fmt: skip
    "sft": ["train.max_steps=3", "train.eval_every=3", "--limit", "120"],
    "sft-classify": ["--limit", "200", "--epochs", "2"],
    "eval": ["eval.limit=20", "eval.max_tokens=4096"],
}
# Commands that are the test suite itself, or that install: shown for users, not re-run from inside the tests.
NOT_RUN = ("scripts/install.sh --dev", ".venv/bin/python -m pytest")


@dataclass
class Command:
    line: str
    block: int
    expected_error: list[str] = field(default_factory=list)


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def _commands(body: str, block: int) -> list[Command]:
    out: list[Command] = []
    lines = body.replace("\\\n", " ").splitlines()
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment = stripped.lstrip("#").strip()
            if comment.startswith("error:") or (out and out[-1].expected_error):
                out[-1].expected_error.append(comment)
            continue
        if stripped:
            out.append(Command(re.split(r"\s+#\s", stripped)[0].strip(), block))
    return out


def _placeholders(work: Path) -> dict[str, str]:
    texts = work / "my-texts"
    texts.mkdir()
    for name in ("TinyStories-valid_excerpt.txt", "cs336_tinystories_sample.txt"):
        (texts / name).write_text((SHARED / "tinystories" / name).read_text(encoding="utf-8"), encoding="utf-8")
    (texts / "notes.md").write_text("# Notes\n\n" + "A line of my own notes about the project.\n" * 20, encoding="utf-8")
    return {
        "/path/to/my/texts": str(texts),
        "/path/to/crawl": str(SHARED / "web" / "wget_warc"),
        "/path/to/web.jsonl": str(SHARED / "web" / "cc_text" / "llamafactory_c4_demo.jsonl"),
        "/path/to/eval/files": str(SHARED / "eval" / "mc"),
        "../shared/data": str(SHARED),
    }


def _substitute(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace(key, value)
    unknown = re.findall(r"/path/to/[\w./-]+", text)
    assert not unknown, f"README placeholder(s) {unknown} have no stand-in in tests/test_readme.py"
    return text


def _chat_file(path: Path) -> None:
    """A small messages-format file for the README's `--data chat.jsonl` (made here from Alpaca records)."""
    records = json.loads((SHARED / "instruct" / "alpaca_data_first200.json").read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as f:
        for r in records[:150]:
            user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
            f.write(json.dumps({"messages": messages}) + "\n")


def _argv(line: str) -> tuple[list[str], str]:
    """The command as argv with the small settings appended, and the text fed to its standard input."""
    line = re.sub(r"^scripts/install\.sh\s*&&\s*", "", line)
    argv = shlex.split(line)
    tools = {".venv/bin/lmforge": "lmforge", ".venv/bin/python": "python"}
    argv[0] = tools.get(argv[0], argv[0])
    stdin = ""
    if argv[0] == "lmforge":
        verb = argv[1] if len(argv) > 1 else ""
        key = "sft-classify" if verb == "sft" and "classify" in argv else verb
        argv += SMALL.get(key, [])
        if verb == "chat":
            stdin = "Write a haiku about rivers.\n/exit\n"
        if verb == "generate":
            argv += ["--max-tokens", "16"]
    elif argv[0] == "torchrun":
        argv += SMALL["pretrain"]
    if argv[0] in ("lmforge", "torchrun", "python"):
        argv[0] = str(BIN / argv[0])
    return argv, stdin


def _matches(expected: list[str], output: str) -> list[str]:
    """The expected lines (with `...` elisions) that are not in the output."""
    flat = " ".join(output.split())
    missing = []
    for line in expected:
        pieces = [p.strip() for p in re.split(r"\.\.\.|…", line) if p.strip(" ,")]
        if not all(" ".join(p.split()) in flat for p in pieces):
            missing.append(line)
    return missing


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared datasets are not at {SHARED}")
def test_every_readme_command_runs(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    places = _placeholders(tmp_path)
    work = tmp_path / "user"
    work.mkdir()
    _chat_file(work / "chat.jsonl")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    blocks = [(lang, _substitute(body, places)) for lang, body in _blocks(readme)]
    for i, (lang, body) in enumerate(blocks):  # recipe files first: the README names one before it shows it
        if lang == "yaml":
            from lmforge.recipe import validate_recipe

            validate_recipe(yaml.safe_load(body), source=f"README.md yaml block {i}")  # every documented key exists
            first = body.splitlines()[0].strip()
            if re.fullmatch(r"#\s*[\w.-]+\.ya?ml", first):
                (work / first.lstrip("# ").strip()).write_text(body, encoding="utf-8")
    ran = 0
    for i, (lang, body) in enumerate(blocks):
        if lang == "python":
            proc = subprocess.run([sys.executable, "-c", body], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=600)  # fmt: skip
            assert proc.returncode == 0, f"README python block {i} failed:\n{body}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            ran += 1
            continue
        if lang != "bash":
            continue
        for cmd in _commands(body, i):
            if any(cmd.line.startswith(skip) or skip in cmd.line for skip in NOT_RUN):
                continue
            argv, stdin = _argv(cmd.line)
            t0 = time.perf_counter()
            proc = subprocess.run(argv, cwd=work, env=env, input=stdin, capture_output=True, text=True, timeout=900)
            print(f"{time.perf_counter() - t0:6.1f} s  rc {proc.returncode}  {cmd.line}")  # shown with pytest -s
            output = proc.stdout + proc.stderr
            shown = f"$ {cmd.line}\n(ran: {shlex.join(argv)})\n{output[-4000:]}"
            if cmd.expected_error:
                assert proc.returncode != 0, f"README shows this command failing, but it succeeded:\n{shown}"
                missing = _matches(cmd.expected_error, output)
                assert not missing, f"README's error text {missing} is not what the command printed:\n{shown}"
            else:
                assert proc.returncode == 0, f"README command failed (rc {proc.returncode}):\n{shown}"
            ran += 1
    assert ran >= 20, f"only {ran} README commands found: has the README's layout changed?"


def _figures_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_figures_come_from_the_recorded_run():
    """The README's default-run figures are exactly what docs/default-run.json renders to: no number is typed by hand."""
    figures = _figures_script()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    recorded = json.loads(figures.RECORD.read_text(encoding="utf-8"))
    assert figures.rewrite(readme, figures.render(recorded)) == readme, (
        "README figures are stale: run python scripts/readme_figures.py render"
    )
    # Changing a recorded number changes the README block, so the check above can fail.
    changed = {**recorded, "val_bpb": recorded["val_bpb"] + 0.5}
    assert figures.rewrite(readme, figures.render(changed)) != readme
