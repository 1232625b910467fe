"""Output folders (issue 13): no verb deletes or overwrites files lmforge did not write, a training verb resumes
only the same job and starts a different one over, and sft refuses options of another method or task."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.outdir import MARKER, OutputDirError, claim_output_dir
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig

from helpers import INSTRUCT_DATA, json_package_run, sft_on_file, tiny_chat_model

FAST = ["train.warmup_steps=1", "train.eval_every=100", "train.ckpt_every=100", "train.seq_len=128",
        "train.batch_size=8", "train.compile=false", "train.threads=1"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "labels.jsonl"
    rows = [{"text": f"{'good' if i % 2 else 'bad'} thing number {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(20)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _foreign(folder: Path) -> Path:
    """A folder of the user's: a notes file and a subfolder."""
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.md").write_text("mine", encoding="utf-8")
    return folder


def _cfg(**kw) -> TrainConfig:
    settings = dict(seq_len=128, batch_size=8, max_steps=4, lr=3e-3, warmup_steps=1, eval_every=100, ckpt_every=2,
                    compile=False, threads=1, device="cpu")  # fmt: skip
    return TrainConfig(**{**settings, **kw})


def _verbs(ckpt: Path, labelled: Path) -> dict[str, list[str]]:
    """Each verb's command line, minus the output folder (appended by the test)."""
    return {
        "curate": ["curate", "stdlib", "-o"],
        "tokenizer": ["tokenizer", "curated", "-o"],
        "shards": ["shards", "curated", "-t", "tok.json", "-o"],
        "pretrain": ["pretrain", "shards", "-t", "tok.json", "-o"],
        "sft": ["sft", str(ckpt), "--data", INSTRUCT_DATA, "--limit", "20", "-o"],
        "classify": ["sft", str(ckpt), "--task", "classify", "--data", str(labelled), "-o"],
        "eval": ["eval", str(ckpt), "--text", INSTRUCT_DATA, "-o"],
        "embed": ["embed", str(ckpt), "--pairs", "stdlib", "--finetune-steps", "1", "--finetune-out"],
        "export": ["export", str(ckpt)],
    }


@pytest.mark.parametrize("verb", ["curate", "tokenizer", "shards", "pretrain", "sft", "classify", "eval", "embed",
                                  "export"])  # fmt: skip
def test_every_verb_refuses_a_folder_lmforge_did_not_write(ckpt, labelled, tmp_path, monkeypatch, verb):
    monkeypatch.chdir(tmp_path)  # the inputs named in _verbs exist (pretrain checks them before its folder)
    (tmp_path / "shards").mkdir()
    (tmp_path / "tok.json").write_text("{}", encoding="utf-8")
    folder = _foreign(tmp_path / "mine")
    result = CliRunner().invoke(app, [*_verbs(ckpt, labelled)[verb], str(folder)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"{folder}" in message and "notes.md, sub/" in message
    assert "move them away" in message or "move those files away" in message
    assert (folder / "notes.md").read_text(encoding="utf-8") == "mine" and (folder / "sub").is_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.md", "sub"]  # not even marked


def test_export_replaces_an_earlier_export_but_never_a_users_file(ckpt, tmp_path):
    out = tmp_path / "hf"
    assert CliRunner().invoke(app, ["export", str(ckpt), str(out)]).exit_code == 0
    assert CliRunner().invoke(app, ["export", str(ckpt), str(out)]).exit_code == 0  # an earlier export: replaced
    assert json.loads((out / MARKER).read_text())["verb"] == "export"
    (out / "notes.md").write_text("mine", encoding="utf-8")
    result = CliRunner().invoke(app, ["export", str(ckpt), str(out)])
    assert result.exit_code == 2
    assert "holds files `lmforge export` did not write (notes.md); it replaces the whole folder" in result.output
    assert (out / "notes.md").read_text(encoding="utf-8") == "mine"


def test_export_help_names_the_architectures_it_writes():
    text = " ".join(CliRunner().invoke(app, ["export", "--help"]).output.split())
    assert "LlamaForCausalLM" in text and "Qwen3ForCausalLM for a model with qk_norm" in text
    assert "GPT2LMHeadModel for model.arch=gpt2" in text


def test_a_folder_another_verb_wrote_is_refused(tmp_path):
    claim_output_dir(tmp_path / "out", "curate")
    with pytest.raises(OutputDirError, match=r"holds the output of `lmforge curate`; give `lmforge tokenizer` a"):
        claim_output_dir(tmp_path / "out", "tokenizer")
    claim_output_dir(tmp_path / "out", "curate")  # its own verb may write there again


def test_embed_refuses_to_overwrite_a_file_it_did_not_write(ckpt, tmp_path):
    (tmp_path / "vectors.npy").write_bytes(b"mine")
    result = CliRunner().invoke(app, ["embed", str(ckpt), "--text", INSTRUCT_DATA, "-o", str(tmp_path / "vectors.npy")])
    assert result.exit_code == 2 and "there is no vectors.npy.ids.txt beside it" in result.output
    assert (tmp_path / "vectors.npy").read_bytes() == b"mine"


def test_sft_with_different_data_starts_over_and_trains_on_it(ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    first = sft_on_file(ckpt, INSTRUCT_DATA, out, _cfg(), limit=40)
    assert first["steps"] == 4
    (out / "notes.md").write_text("mine", encoding="utf-8")  # a user's file in lmforge's folder stays
    other = tmp_path / "other.jsonl"
    records = json.loads(Path(INSTRUCT_DATA).read_text(encoding="utf-8"))[100:140]
    other.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        again = sft_on_file(ckpt, other, out, _cfg(), limit=40)
    assert f"{out} holds a different job (changed: data); starting over, replacing its checkpoints, final, " \
           "metrics.jsonl" in caplog.text  # fmt: skip
    assert again["resumed_from"] is None and again["steps"] == 4  # it trained, on the new data
    assert again["heldout_loss_before"] != first["heldout_loss_before"]
    assert (out / "notes.md").read_text(encoding="utf-8") == "mine"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        same = sft_on_file(ckpt, other, out, _cfg(), limit=40)
    assert "holds this same job" in caplog.text and same["resumed_from"] == 4


def test_lora_into_a_full_fine_tunes_folder_starts_over_instead_of_crashing(ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    sft_on_file(ckpt, INSTRUCT_DATA, out, _cfg(), limit=40)
    with caplog.at_level(logging.INFO):
        m = sft_on_file(ckpt, INSTRUCT_DATA, out, _cfg(), limit=40, method="lora", lora_rank=4)
    assert "holds a different job (changed: lora_rank, method)" in caplog.text
    assert m["method"] == "lora" and m["resumed_from"] is None and (out / "adapter" / "adapter.json").is_file()


def test_the_sft_command_starts_a_changed_job_over(ckpt, tmp_path):
    out = tmp_path / "out"
    base = ["sft", str(ckpt), "--data", INSTRUCT_DATA, "--limit", "40", "-o", str(out), "train.max_steps=2", *FAST]
    assert CliRunner().invoke(app, base).exit_code == 0
    result = CliRunner().invoke(app, [*base, "--method", "lora", "--lora-rank", "4"])
    assert result.exit_code == 0, result.output
    marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    assert marker["verb"] == "sft" and marker["job"]["config"]["method"] == "lora"
    assert marker["job"]["config"]["lora_rank"] == 4 and (out / "adapter").is_dir()


def test_pretrain_with_a_changed_model_starts_over(tmp_path, caplog):
    from lmforge.pretrain import pretrain

    data = json_package_run(tmp_path)
    train_cfg = TrainConfig(seq_len=32, batch_size=2, max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1,
                            ckpt_every=2, threads=1, compile=False)  # fmt: skip
    run = lambda width: pretrain(data / "shards", data / "tokenizer" / "tokenizer.json",  # noqa: E731
                                 ModelConfig(depth=1, d_model=width, max_seq_len=32), train_cfg, tmp_path / "pre")
    run(64)
    with caplog.at_level(logging.INFO):
        m = run(128)  # resuming would load 64-wide weights into a 128-wide model
    assert "holds a different job (changed: model.d_model)" in caplog.text and m["resumed_from"] is None
    assert json.loads((tmp_path / "pre" / MARKER).read_text())["job"]["config"]["model"]["d_model"] == 128


@pytest.mark.parametrize(("options", "message"), [
    (["--lora-rank", "4"], "--lora-rank is a --method lora option, and this run is --method full: drop --lora-rank "
                           "or add --method lora"),
    (["--method", "prefix", "--lora-targets", "q_proj"], "--lora-targets is a --method lora option, and this run is "
                                                         "--method prefix"),
    (["--method", "lora", "--freeze-blocks", "0"], "--freeze-blocks is a --method full option, and this run is "
                                                   "--method lora"),
    (["--prefix-reparam"], "--prefix-reparam is a --method prefix option"),
    (["--pooling", "last"], "--pooling is a --task classify option, and this run is --task chat: drop --pooling or "
                            "add --task classify"),
    (["--task", "classify", "--method", "lora"], "--method is a --task chat option, and this run is --task classify"),
    (["--task", "classify", "--train-on", "all"], "--train-on is a --task chat option"),
])  # fmt: skip
def test_sft_refuses_options_of_another_method_or_task(tmp_path, options, message):
    result = CliRunner().invoke(app, ["sft", "ckpt", "--data", "data.jsonl", "-o", str(tmp_path / "o"), *options])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["curate", "nope"], ["tokenizer", "nope"], ["shards", "nope", "-t", "nope.json"],
                                  ["pretrain", "nope", "-t", "nope.json"], ["sft", "nope", "--data", "nope.json"],
                                  ["sft", "nope", "--task", "classify", "--data", "nope.json"],
                                  ["eval", "nope", "--text", "nope"]])  # fmt: skip
def test_a_verb_given_a_missing_input_leaves_no_output_folder(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*argv, "-o", "out"])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception) + result.output
    assert not (tmp_path / "out").exists()


def test_a_failed_verb_keeps_a_folder_that_already_existed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(app, ["tokenizer", "nope", "-o", "out"])
    assert result.exit_code != 0 and (tmp_path / "out").is_dir()
