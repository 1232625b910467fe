"""Recipe validation: every mistake is caught before work starts, with a message naming key, value and choices."""

import pytest

from lmforge.recipe import (
    DEFAULT_RECIPE,
    RecipeError,
    apply_overrides,
    load_recipe,
    resolve_recipe_path,
    validate_recipe,
)


def test_default_recipe_loads_and_is_the_stdlib_code_recipe():
    r = load_recipe()
    assert r.name == DEFAULT_RECIPE == "stdlib-code"
    assert r.data.source == "stdlib"
    assert r.stages == ["curate", "tokenizer", "shards", "pretrain", "sft", "eval", "export", "report"]
    assert r.sft.data == "docstring_pairs" and r.sft.train.max_steps == 100
    # A recipe that does not list its stages runs every stage but sft (fine-tuning needs data chosen for it).
    assert validate_recipe({}).stages == ["curate", "tokenizer", "shards", "pretrain", "eval", "export", "report"]


def test_overrides_parse_values_like_yaml():
    r = load_recipe(None, ["train.max_steps=12", "model.tie_embeddings=true", "eval.top_k=null", "name=x"])
    assert r.train.max_steps == 12 and r.model.tie_embeddings is True and r.eval.top_k is None and r.name == "x"
    r = load_recipe(None, ["eval.prompts=[a, b]", "train.lr=1e-3"])
    assert r.eval.prompts == ["a", "b"] and r.train.lr == pytest.approx(1e-3)


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["train.max_step=5"])
    msg = str(e.value)
    assert "unknown key 'train.max_step'" in msg
    assert "max_steps" in msg and "warmup_steps" in msg


def test_unknown_section_is_rejected():
    with pytest.raises(RecipeError, match=r"unknown key 'trainer'.*allowed keys here: .*train"):
        load_recipe(None, ["trainer.lr=1"])


def test_bad_value_names_key_value_and_allowed_values():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["train.schedule=cosin"])
    msg = str(e.value)
    assert "train.schedule = 'cosin'" in msg and "'cosine'" in msg and "'linear'" in msg

    with pytest.raises(RecipeError, match=r"train.lr = -1: Input should be greater than 0"):
        load_recipe(None, ["train.lr=-1"])
    with pytest.raises(RecipeError, match=r"model.depth = 'deep'"):
        load_recipe(None, ["model.depth=deep"])


def test_cross_field_checks():
    with pytest.raises(RecipeError, match=r"train.seq_len=512 exceeds model.max_seq_len=256"):
        load_recipe(None, ["train.seq_len=512"])
    with pytest.raises(RecipeError, match=r"n_heads=3 must be divisible by n_kv_heads=2"):
        load_recipe(None, ["model.n_kv_heads=2"])
    with pytest.raises(RecipeError, match=r"stages must be in lifecycle order"):
        load_recipe(None, ["stages=[pretrain, curate]"])
    with pytest.raises(RecipeError, match=r"stages.0 = 'train'"):
        load_recipe(None, ["stages=[train]"])


def test_malformed_override_and_missing_recipe():
    with pytest.raises(RecipeError, match=r"override 'train.max_steps' must look like key.sub=value"):
        load_recipe(None, ["train.max_steps"])
    with pytest.raises(RecipeError, match=r"'train.max_steps' is a value, not a section"):
        apply_overrides({"train": {"max_steps": 3}}, ["train.max_steps.x=1"])
    with pytest.raises(RecipeError, match=r"no recipe file or built-in recipe named 'nope'; built-in recipes: "
                                          r"\['stdlib-code', 'web'\]"):
        resolve_recipe_path("nope")
    with pytest.raises(RecipeError, match=r"recipe file missing.yaml does not exist"):
        resolve_recipe_path("missing.yaml")


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(RecipeError, match=r"recipe .*bad.yaml is not valid YAML"):
        load_recipe(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(RecipeError, match=r"must be a mapping of sections, got int"):
        load_recipe(str(scalar))
    good = tmp_path / "good.yaml"
    good.write_text("name: mine\ndata:\n  source: /some/dir\ntrain:\n  max_steps: 7\n")
    r = load_recipe(str(good), ["train.batch_size=4"])
    assert (r.name, r.data.source, r.train.max_steps, r.train.batch_size) == ("mine", "/some/dir", 7, 4)
    assert str(r.run_path) == "runs/mine"


def test_validate_recipe_reports_every_error_at_once():
    with pytest.raises(RecipeError) as e:
        validate_recipe({"train": {"lr": 0, "batch_size": 0}, "colour": "red"})
    msg = str(e.value)
    assert "train.lr = 0" in msg and "train.batch_size = 0" in msg and "unknown key 'colour'" in msg
