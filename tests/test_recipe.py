"""Recipe validation: every mistake is caught before work starts, with a message naming key, value and choices."""

import re

import pytest

from lmforge.recipe import (
    BUILTIN_DIR,
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
    assert r.stages == ["curate", "tokenizer", "shards", "pretrain", "sft", "grpo", "eval", "export", "report"]
    assert r.sft.data == "docstring_pairs" and r.sft.train.max_steps == 100
    # completes_function alone is won by `return self`; the similarity to the real body keeps replies honest
    assert r.grpo.rewards == {"completes_function": 1.0, "reference_similarity": 3.0} and r.grpo.train.max_steps == 14
    # A recipe that does not list its stages runs every stage but sft (fine-tuning needs data chosen for it).
    assert validate_recipe({}).stages == ["curate", "tokenizer", "shards", "pretrain", "eval", "export", "report"]


def test_a_recipe_starting_from_a_pretrained_model_imports_it_instead_of_pretraining():
    r = validate_recipe({"model": {"init_from": "models/qwen"}})
    assert r.stages == ["curate", "import", "eval", "export", "report"]
    listed = validate_recipe({"model": {"init_from": "m"}, "stages": ["curate", "import", "sft", "eval"]})
    assert listed.stages == ["curate", "import", "sft", "eval"]
    with pytest.raises(RecipeError, match="stages lists both import and pretrain: with model.init_from, pretrain "
                                          "continues pre-training the imported model itself; remove 'import'"):
        validate_recipe({"model": {"init_from": "m"}, "stages": ["curate", "tokenizer", "shards", "pretrain",
                                                                  "import"]})  # fmt: skip
    with pytest.raises(RecipeError, match="the import stage imports model.init_from, which is unset"):
        validate_recipe({"stages": ["curate", "import"]})


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


def test_a_recipe_file_without_name_is_named_after_the_file_and_says_where_its_defaults_come_from(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    mine = tmp_path / "my-recipe.yaml"
    mine.write_text("data:\n  source: /some/dir\n")
    r = load_recipe(str(mine))
    assert (r.name, str(r.run_path), r.data.source) == ("my-recipe", "runs/my-recipe", "/some/dir")
    # No base: every other setting is the schema's default, and the run says so at its start.
    assert (r.model.depth, r.train.max_steps) == (4, 1000)
    assert r.describe_origin() == (f"recipe {mine} -> runs/my-recipe; settings it does not give take the defaults "
                                   "of each stage's schema (docs/settings.md lists every setting) (it names no base: "
                                   "recipe)")  # fmt: skip
    assert load_recipe(str(empty)).name == "empty"
    assert load_recipe(str(empty), ["name=other"]).name == "other"
    assert r.origin == str(mine.resolve()) and load_recipe().origin == "built-in recipe stdlib-code"


def test_base_recipe_fills_the_settings_a_recipe_leaves_unset(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: stdlib-code\ndata:\n  source: /my/text\ntrain:\n  max_steps: 40\n")
    r = load_recipe(str(mine), ["train.lr=0.001"])
    builtin = load_recipe()
    assert r.name == "mine", "a base's name is never inherited: its run directory is its own"
    assert (r.data.source, r.train.max_steps, r.train.lr) == ("/my/text", 40, 0.001)
    # Sections merge key by key: the base's other data, model and train settings stay.
    assert r.data.fix_mojibake is False and r.data.near_dedup is True and r.model.depth == 3
    assert r.train.optimizer == "muon" and r.stages == builtin.stages and r.sft == builtin.sft
    assert r.describe_origin() == (f"recipe {mine} -> runs/mine; settings it does not give come from base recipe "
                                   f"{BUILTIN_DIR / 'stdlib-code.yaml'}, then the defaults of each stage's schema "
                                   "(docs/settings.md lists every setting)")  # fmt: skip
    # A base file is found beside the recipe; a mixture of objectives is a value, replaced rather than merged.
    (tmp_path / "mix.yaml").write_text("pretrain:\n  objective: {clm: 1, mlm: 1}\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../mix.yaml\npretrain:\n  objective: {span: 1}\n")
    assert load_recipe(str(child)).pretrain.objective == {"span": 1.0}


def test_base_mistakes_are_named(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match=f"^{re.escape(f'{b}: base: {a} is already a recipe in this chain')}; "
                                          "bases must not form a loop$"):  # fmt: skip
        load_recipe(str(a))
    a.write_text("base: nope\n")
    with pytest.raises(RecipeError, match=f"^{re.escape(str(a))}: base: no recipe file or built-in recipe named"):
        load_recipe(str(a))
    with pytest.raises(RecipeError, match=r"^override 'base=web': the base recipe is named in a recipe file"):
        load_recipe(None, ["base=web"])


def test_a_typo_is_blamed_where_it_was_typed_with_the_closest_key():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["train.schedul=linear"])
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid settings:"
    assert lines[1].startswith("  override 'train.schedul=linear': unknown key 'train.schedul' (did you mean "
                               "'train.schedule'?); allowed keys here: activation_checkpointing, batch_size,")
    assert "stdlib-code.yaml" not in str(e.value)
    with pytest.raises(RecipeError, match=r"override 'bse=x': unknown key 'bse' \(did you mean 'base'\?\)"):
        load_recipe(None, ["bse=x"])
    with pytest.raises(RecipeError, match=r"override 'model.n_kv_heads=2': model: n_heads=3 must be divisible"):
        load_recipe(None, ["model.n_kv_heads=2"])


def test_a_typo_in_the_recipe_file_blames_the_file(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  sorce: /x\ntrain:\n  lr: 1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(str(mine), ["train.lr=-1"])
    lines = str(e.value).splitlines()
    assert lines[1].startswith(f"  {mine}: unknown key 'data.sorce' (did you mean 'data.source'?); allowed keys here:")
    assert lines[2] == "  override 'train.lr=-1': train.lr = -1: Input should be greater than 0"
    # A setting the base gives is blamed on the base file.
    mine.write_text(f"base: {tmp_path / 'base.yaml'}\n")
    (tmp_path / "base.yaml").write_text("eval:\n  top_k: 0\n")
    base_typo = f"  {tmp_path / 'base.yaml'}: eval.top_k = 0: Input should be greater than 0"
    with pytest.raises(RecipeError, match=re.escape(base_typo)):
        load_recipe(str(mine))
