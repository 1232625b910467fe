"""The recipe's sft stage: docstring -> body pairs from the run's curated code, fine-tuned on the shared loop."""

import json

import pytest

from lmforge.data.readers import stdlib_root
from lmforge.model.io import load_model
from lmforge.pipeline import run_recipe, stage_config
from lmforge.recipe import RecipeError, load_recipe


def _recipe(root, *extra):
    return load_recipe(None, [
        f"data.source={stdlib_root() / 'email'}", "data.val_fraction=0.25", "data.near_dedup=false", "data.pii=false",
        "tokenizer.vocab_size=512", "model.depth=1", "model.max_seq_len=256", "train.seq_len=256",
        "train.batch_size=8", "train.max_steps=30", "train.compile=false", "train.optimizer=adamw",
        "train.eval_every=1000", "train.ckpt_every=1000", "sft.train.max_steps=40", "sft.train.batch_size=8",
        "sft.train.lr=0.003", "sft.train.compile=false", "sft.gen_prompts=6", "sft.gen_tokens=48", "sft.samples=2",
        "stages=[curate, tokenizer, shards, pretrain, sft, export, report]", f"run_dir={root}", "name=r", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    recipe = _recipe(tmp_path_factory.mktemp("sftstage"))
    outcomes = run_recipe(recipe)
    return recipe, outcomes


def test_stage_tunes_on_pairs_from_the_curated_splits(run):
    recipe, outcomes = run
    root = recipe.run_path
    assert [o.stage for o in outcomes] == ["curate", "tokenizer", "shards", "pretrain", "sft", "export", "report"]
    m = json.loads((root / "sft" / "manifest.json").read_text())["metrics"]
    assert m["data"] == "docstring_pairs" and m["method"] == "full" and m["steps"] == 40
    assert m["heldout_loss_after"] < m["heldout_loss_before"]
    # The pairs are written out in messages format; held-out ids name curated validation files only.
    train = [json.loads(line) for line in (root / "sft/data/train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (root / "sft/data/heldout.jsonl").read_text().splitlines()]
    assert len(train) == m["train_conversations"] and len(heldout) == m["heldout_conversations"] > 0
    val_files = {json.loads(line)["id"] for line in _curated_lines(root / "curate" / "val")}
    assert {r["id"].split(":")[0] for r in heldout} <= val_files
    assert not {r["id"].split(":")[0] for r in train} & val_files
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in heldout}
    for r in train[:50]:
        assert [x["role"] for x in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"].lstrip().startswith(("def ", "async def ", "@"))
    # Greedy generations were checked before and after, and a few are kept for the report.
    before, after = m["generation_before"], m["generation_after"]
    assert after["ended_turn"] > before["ended_turn"]  # tuned replies end their turn instead of running on
    for rates in (before, after):
        assert 0.0 <= rates["completes_function"] <= rates["ended_turn"] <= 1.0
    assert len(m["samples"]) == 2 and all(s["prompt"] for s in m["samples"])
    report = (root / "report.md").read_text()
    assert "## Fine-tuning" in report and "Fine-tuning sample 1" in report
    # Export takes the fine-tuned model when the recipe fine-tunes.
    tuned, _ = load_model(root / "sft" / "final")
    assert (root / "export" / "hf" / "config.json").is_file() and tuned.args.n_layers == 1


def _curated_lines(split_dir):
    import io

    import zstandard

    for part in sorted(split_dir.glob("part-*.jsonl.zst")):
        with open(part, "rb") as f:
            yield from io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")


def test_rerun_skips_and_sft_settings_invalidate_only_sft(run):
    recipe, _ = run
    again = run_recipe(recipe)
    assert [o.action for o in again] == ["skipped"] * 7
    # A faster-or-slower-only setting does not count; a learning rate does.
    assert stage_config(recipe, "sft") == stage_config(_recipe(recipe.run_dir, "sft.train.threads=1"), "sft")
    assert stage_config(recipe, "sft") != stage_config(_recipe(recipe.run_dir, "sft.train.lr=0.001"), "sft")
    assert stage_config(recipe, "pretrain") == stage_config(_recipe(recipe.run_dir, "sft.train.lr=0.001"), "pretrain")


def test_sft_settings_are_validated(tmp_path):
    with pytest.raises(RecipeError, match="sft.train.seq_len"):
        _recipe(tmp_path, "sft.train.seq_len=512")
    with pytest.raises(RecipeError, match="sft.method"):
        _recipe(tmp_path, "sft.method=qlora")
    with pytest.raises(RecipeError, match="unknown key 'sft.train.steps'"):
        _recipe(tmp_path, "sft.train.steps=3")


def _curated(root, split_files):
    """A curate directory whose splits hold the given stdlib files, as plain-JSONL part files."""
    for split, rels in split_files.items():
        (root / split).mkdir(parents=True)
        with open(root / split / "part-00000.jsonl", "w", encoding="utf-8") as f:
            for rel in rels:
                text = (stdlib_root() / rel).read_text(encoding="utf-8")
                f.write(json.dumps({"id": rel, "text": text, "source": rel}) + "\n")
    return root


def test_pairs_fall_back_to_a_share_of_training_pairs_when_validation_has_none(tmp_path, caplog):
    from lmforge.finetune.stage import docstring_pairs
    from lmforge.finetune.config import SFTConfig
    from lmforge.tokenizer import train_tokenizer

    curate = _curated(tmp_path / "curate", {"train": ["textwrap.py", "shlex.py"], "val": ["this.py"]})
    tok = train_tokenizer([(stdlib_root() / "textwrap.py").read_text(encoding="utf-8")], vocab_size=400)
    cfg = SFTConfig(train={"seq_len": 1024}, val_fraction=0.2)
    train, heldout, counts = docstring_pairs(curate, tok, cfg)
    assert "holding out" in caplog.text and heldout
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert len(heldout) == round(0.2 * (len(train) + len(heldout)))
    with pytest.raises(ValueError, match=r"fit sft.train.seq_len=8 tokens \(\d+ were longer\)"):
        docstring_pairs(curate, tok, SFTConfig(train={"seq_len": 8}))
