"""Starting from a pre-trained Hugging Face model: `lmforge import`, hub ids, LoRA fine-tuning of an imported model
through to its export, and recipes with model.init_from (lmforge.importing)."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import INSTRUCT_DATA, sft_on_file, tiny_hf_chat_model
from lmforge.cli import app
from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids, render
from lmforge.model.io import load_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig

transformers = pytest.importorskip("transformers")

CONVERSATION = [Message("user", "Wrap this text."), Message("assistant", "Here it is, wrapped.")]


@pytest.fixture(scope="module")
def qwen_bf16(tmp_path_factory) -> Path:
    return tiny_hf_chat_model(tmp_path_factory.mktemp("qwen") / "model", dtype=torch.bfloat16)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_import_converts_once_keeping_dtype_tokenizer_and_template(qwen_bf16, tmp_path):
    result = invoke("import", qwen_bf16, "-o", tmp_path / "ckpt")
    assert result.exit_code == 0, result.output
    ckpt = tmp_path / "ckpt"
    assert {"model.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "source.json"} <= {
        p.name for p in ckpt.iterdir()}  # fmt: skip
    source = json.loads((ckpt / "source.json").read_text())
    assert source["model_type"] == "qwen2" and source["dtype"] == "bfloat16"
    model, args = load_model(ckpt)
    assert next(model.parameters()).dtype == torch.bfloat16, "the stored dtype is kept"
    direct, _ = load_model(qwen_bf16)
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), direct(ids)), "the checkpoint computes what the folder does"
    ours, theirs = Tokenizer.from_dir(ckpt), transformers.AutoTokenizer.from_pretrained(qwen_bf16)
    msgs = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    assert render(ours, CONVERSATION)[0] == list(theirs.apply_chat_template(msgs, tokenize=True, return_dict=False))
    assert prompt_ids(ours, CONVERSATION[:1]) == list(
        theirs.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ours.stop_ids == [theirs.convert_tokens_to_ids("<|im_end|>")]

    wide = invoke("import", qwen_bf16, "-o", tmp_path / "fp32", "--dtype", "float32")
    assert wide.exit_code == 0, wide.output
    assert next(load_model(tmp_path / "fp32")[0].parameters()).dtype == torch.float32
    again = invoke("import", qwen_bf16, "-o", tmp_path / "fp32")  # an earlier import is replaced as a whole
    assert again.exit_code == 0, again.output
    assert next(load_model(tmp_path / "fp32")[0].parameters()).dtype == torch.bfloat16
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    refused = invoke("import", qwen_bf16, "-o", tmp_path / "mine")
    assert refused.exit_code == 2 and "lmforge did not write it" in refused.output


def test_hub_ids_come_from_the_local_cache_or_say_how_to_download(qwen_bf16, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    missing = invoke("import", "Org/tiny", "-o", tmp_path / "out")
    assert missing.exit_code == 2
    assert "'Org/tiny' is neither a local directory nor in the Hugging Face cache" in missing.output
    assert "lmforge never downloads" in missing.output and "hf download Org/tiny --local-dir" in missing.output
    assert not (tmp_path / "out").exists()
    repo = tmp_path / "hub" / "models--Org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(qwen_bf16, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    found = invoke("import", "Org/tiny", "-o", tmp_path / "out")
    assert found.exit_code == 0, found.output
    assert json.loads((tmp_path / "out" / "source.json").read_text())["source"] == "Org/tiny"


def test_lora_on_an_imported_model_trains_merges_and_exports(qwen_bf16, tmp_path):
    from lmforge.hf import export_hf

    train = TrainConfig(max_steps=30, batch_size=8, lr=3e-3, seq_len=128, compile=False, optimizer="adamw",
                        eval_every=1000, ckpt_every=1000, device="cpu")  # fmt: skip
    metrics = sft_on_file(qwen_bf16, INSTRUCT_DATA, tmp_path / "sft", train, method="lora", lora_rank=8)
    assert metrics["method"] == "lora"
    assert metrics["heldout_loss_after"] < metrics["heldout_loss_before"]
    tuned, args = load_model(tmp_path / "sft" / "final")
    base, _ = load_model(qwen_bf16, dtype=torch.float32)
    assert next(tuned.parameters()).dtype == torch.float32, "fine-tuned in fp32 master weights"
    assert not any("lora" in name for name in tuned.state_dict()), "the adapters are merged into the weights"
    assert not torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    out = export_hf(tmp_path / "sft" / "final", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - tuned(ids)).abs().max().item() <= 1e-4
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    assert list(theirs.apply_chat_template(msgs, tokenize=True, return_dict=False)) == render(
        Tokenizer.from_dir(tmp_path / "sft" / "final"), CONVERSATION)[0]  # fmt: skip


def _recipe(root: Path, model: Path, stages: str, *extra: str):
    from lmforge.data.readers import stdlib_root
    from lmforge.recipe import load_recipe

    return load_recipe(None, [
        f"data.source={stdlib_root() / 'email'}", "data.val_fraction=0.25", "data.near_dedup=false", "data.pii=false",
        f"model.init_from={model}", f"stages={stages}", f"run_dir={root}", "name=r", "eval.samples=1",
        "eval.sample_tokens=16", "eval.max_tokens=2000", *extra,
    ])  # fmt: skip


def test_a_recipe_imports_fine_tunes_evaluates_and_exports_a_pretrained_model(qwen_bf16, tmp_path):
    from lmforge.pipeline import run_recipe

    recipe = _recipe(tmp_path, qwen_bf16, "[curate, import, sft, eval, export, report]",
                     f"sft.data={INSTRUCT_DATA}", "sft.train.max_steps=6", "sft.train.batch_size=4",
                     "sft.train.seq_len=128", "sft.train.compile=false")  # fmt: skip
    assert [o.stage for o in run_recipe(recipe)] == ["curate", "import", "sft", "eval", "export", "report"]
    root = recipe.run_path
    imported = json.loads((root / "import" / "manifest.json").read_text())["metrics"]
    assert imported["model_type"] == "qwen2" and imported["chat_template"] is True
    # eval scores the imported (base) model; export takes the fine-tuned one
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["metrics"]["val_bpb"] > 0
    sft_weights = load_model(root / "sft" / "final")[0].state_dict()["model.norm.weight"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(root / "export" / "hf").state_dict()
    assert torch.equal(exported["model.norm.weight"], sft_weights)
    report = (root / "report.md").read_text()
    assert "## Imported model" in report and "qwen2" in report
    again = run_recipe(recipe)  # nothing changed: every stage is skipped, the import too
    assert all(o.action == "skipped" for o in again), [(o.stage, o.action) for o in again]


def test_continued_pretraining_starts_from_the_imported_weights_and_tokenizer(qwen_bf16, tmp_path):
    from lmforge.pipeline import run_recipe

    recipe = _recipe(tmp_path, qwen_bf16, "[curate, tokenizer, shards, pretrain]", "train.max_steps=4",
                     "train.seq_len=64", "train.batch_size=4", "train.compile=false", "train.lr=0.0001",
                     "train.eval_every=1000", "train.ckpt_every=1000")  # fmt: skip
    run_recipe(recipe)
    root = recipe.run_path
    tok = json.loads((root / "tokenizer" / "manifest.json").read_text())["metrics"]
    assert tok["adopted_from"] == str(qwen_bf16) and tok["bytes_per_token"] > 1
    assert (root / "tokenizer" / "tokenizer.json").read_bytes() == (qwen_bf16 / "tokenizer.json").read_bytes()
    tuned, args = load_model(root / "pretrain" / "final")
    base, base_args = load_model(qwen_bf16, dtype=torch.float32)
    assert args == base_args, "the imported architecture, not the recipe's model settings"
    delta = (tuned.model.norm.weight - base.model.norm.weight).abs().max().item()
    assert 0 < delta < 0.01, "four small steps away from the imported weights, not a fresh initialisation"


def test_every_verb_reads_the_hugging_face_folder_itself(qwen_bf16, tmp_path):
    import numpy as np

    from lmforge.data.readers import stdlib_root

    assert invoke("import", qwen_bf16, "-o", tmp_path / "ckpt").exit_code == 0
    greedy = ["--chat", "-p", "Wrap this.", "-n", "6", "--temperature", "0", "--device", "cpu"]
    direct, converted = invoke("generate", qwen_bf16, *greedy), invoke("generate", tmp_path / "ckpt", *greedy)
    assert direct.exit_code == 0, direct.output
    assert direct.output.splitlines()[-1] == converted.output.splitlines()[-1]  # (after the log lines)
    chat = CliRunner().invoke(app, ["chat", str(qwen_bf16), "-n", "4", "--temperature", "0"], input="hi\n/exit\n")
    assert chat.exit_code == 0, chat.output
    text = tmp_path / "held.txt"
    text.write_text((stdlib_root() / "textwrap.py").read_text()[:3000])
    ev = invoke("eval", qwen_bf16, "--text", text, "-o", tmp_path / "eval", "eval.samples=0")
    assert ev.exit_code == 0, ev.output
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]["val_bpb"] > 0
    emb = invoke("embed", qwen_bf16, "--text", text, "-o", tmp_path / "e.npy")
    assert emb.exit_code == 0, emb.output
    assert np.load(tmp_path / "e.npy").shape == (1, 32)
    exported = invoke("export", qwen_bf16, tmp_path / "hf")
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
