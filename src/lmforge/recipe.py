"""Recipes: the schema assembled from every registered stage's settings, YAML loading, base recipes and dotted
overrides.

A recipe is validated completely before any stage runs: an unknown key or a bad value raises
`RecipeError` naming where it was given (recipe file or command-line override), the key, the value given and
what is allowed.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, create_model, model_validator

from lmforge import registry
from lmforge.settings import Section

BUILTIN_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "stdlib-code"


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, the value and what is allowed."""


class RecipeBase(Section):
    """What every recipe has besides the stages' sections, which `recipe_model` adds from the stage registry."""

    # The run's folder under run_dir. A recipe file without `name:` is named after the file (my-recipe.yaml ->
    # my-recipe); `base:` (a built-in recipe or another file) is read by load_recipe, and its name is never inherited.
    name: str = "run"
    run_dir: str = "runs"

    @model_validator(mode="after")
    def _check_stages(self) -> "RecipeBase":
        if "stages" not in self.model_fields_set:  # a stage's `default` may depend on the settings
            self.stages = [s.name for s in registry.all_stages() if registry.in_default_recipe(s, self)]
        known = registry.names()
        order = [s for s in known if s in self.stages]
        if order != list(self.stages):
            raise ValueError(f"stages must be in lifecycle order {known}, got {list(self.stages)}")
        for name in self.stages:  # each stage's own checks across sections (e.g. seq_len vs max_seq_len)
            check = registry.get(name).check
            if check is not None:
                check(self)
        return self

    # Set by load_recipe: the recipe file, and the base recipes its unset settings come from (nearest first).
    _file: Path | None = PrivateAttr(None)
    _bases: list[str] = PrivateAttr(default_factory=list)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    @property
    def origin(self) -> str:
        """The recipe a run directory records as its maker: a built-in recipe by name (its path moves with the
        installation), a file by absolute path; "<dict>" for a recipe built in Python."""
        if self._file is None:
            return "<dict>"
        if self._file.resolve().parent == BUILTIN_DIR.resolve():
            return f"built-in recipe {self._file.stem}"
        return str(self._file.resolve())

    def describe_origin(self) -> str:
        """One line for the start of a run: the recipe, its run directory, and where unset settings come from."""
        where = "a recipe built in Python" if self._file is None else f"recipe {self._file}"
        defaults = "the defaults of each stage's schema (docs/settings.md lists every setting)"
        if self._bases:
            chain = ", then ".join(f"base recipe {b}" for b in self._bases)
            return f"{where} -> {self.run_path}; settings it does not give come from {chain}, then {defaults}"
        return f"{where} -> {self.run_path}; settings it does not give take {defaults} (it names no base: recipe)"


Recipe = RecipeBase  # the type of a validated recipe; its class is built by recipe_model()
_MODEL: tuple[int, type[RecipeBase]] | None = None


def recipe_model() -> type[RecipeBase]:
    """The recipe schema: RecipeBase plus `stages` and every registered stage's sections, in lifecycle order.
    Rebuilt when the registry changes (a stage registered by a plug-in or a test)."""
    global _MODEL
    version = registry.version()
    if _MODEL is not None and _MODEL[0] == version:
        return _MODEL[1]
    stages = registry.all_stages()
    names = tuple(s.name for s in stages)
    defaults = [s.name for s in stages if s.default is True]
    fields: dict[str, Any] = {
        # Every default stage (not sft: fine-tuning needs data chosen for it) unless the recipe lists its own;
        # _check_stages adds those whose `default` is a function of the settings.
        "stages": (list[Literal[names]], Field(default_factory=lambda: list(defaults))),  # type: ignore[valid-type]
    }
    for section, owner in registry.section_owners().items():
        schema = owner.sections[section]
        fields[section] = (schema, Field(default_factory=schema))
    model = create_model("Recipe", __base__=RecipeBase, **fields)
    _MODEL = (version, model)
    return model


Layer = tuple[str, dict]  # where settings were given (a recipe file, a command-line override), and those settings
BASE_KEY = "base"  # a recipe file's key naming the recipe its unset settings come from


def _format_error(err: ValidationError, layers: list[Layer]) -> str:
    """One line per error, led by where the setting was given, so a typo is blamed where it was typed."""
    lines = ["invalid settings:"]
    for e in err.errors():
        loc = e["loc"]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            text = f"unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed)}"
        elif isinstance(e.get("input"), dict):  # a check across a section's keys: its message names them
            text = e["msg"].removeprefix("Value error, ")
            text = f"{key}: {text}" if loc else text
        else:
            text = f"{key} = {e.get('input')!r}: {e['msg']}"
        lines.append(f"  {_blame(loc, layers)}: {text}")
    return "\n".join(lines)


def _blame(loc: tuple, layers: list[Layer]) -> str:
    """Where the setting at `loc` was given: the layer reaching deepest into it, the latest on a tie."""
    if not loc:  # a check across sections: every layer had a part in it
        return " + ".join(label for label, _ in layers)

    def depth(data: Any) -> int:
        for n, part in enumerate(loc):
            if not isinstance(data, dict) or part not in data:
                return n
            data = data[part]
        return len(loc)

    return max(reversed(layers), key=lambda layer: depth(layer[1]))[0]


def _section_model(model: type[BaseModel] | None, key: Any) -> type[BaseModel] | None:
    """The settings class of `model`'s section `key`, or None when `key` holds a value."""
    field = model.model_fields.get(str(key)) if model is not None else None
    ann = field.annotation if field else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = recipe_model()
    for part in loc:
        model = _section_model(model, part)
        if model is None:
            return []
    return sorted([*model.model_fields, *([BASE_KEY] if not loc else [])])


def _merge(under: dict, over: dict, model: type[BaseModel] | None = None) -> dict:
    """`over`'s settings on top of `under`'s: sections merge key by key; values, lists and mixtures are replaced."""
    model = model or recipe_model()
    out = dict(under)
    for key, value in over.items():
        section = _section_model(model, key)
        if section and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value, section)
        out[key] = value
    return out


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict; errors name the offending override."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise RecipeError(f"override '{item}': '{path}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def resolve_recipe_path(name_or_path: str | None, folder: Path | None = None) -> Path:
    """A path to a YAML file (relative to `folder` when given), or the name of a built-in recipe."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if folder is not None and not path.is_absolute():
        path = folder / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    names = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    raise RecipeError(f"no recipe file or built-in recipe named '{name_or_path}'; built-in recipes: {names}")


def _read_recipe_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _with_bases(data: dict, label: str, folder: Path, seen: tuple[Path, ...]) -> list[Layer]:
    """The recipe's layers, the furthest base first: `base:` names the recipe whose settings fill the ones unset."""
    data = dict(data)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return [(label, data)]
    if not isinstance(base, str):
        raise RecipeError(f"{label}: base = {base!r}: give a built-in recipe's name or a YAML file")
    try:
        path = resolve_recipe_path(base, folder)
    except RecipeError as e:
        raise RecipeError(f"{label}: base: {e}") from None
    if path.resolve() in seen:
        raise RecipeError(f"{label}: base: {path} is already a recipe in this chain; bases must not form a loop")
    base_data = _read_recipe_file(path)
    base_data.pop("name", None)  # a run's name is its recipe's own: an inherited one would share the base's folder
    return _with_bases(base_data, str(path), path.parent, (*seen, path.resolve())) + [(label, data)]


def _build(data: dict, label: str, folder: Path, overrides: list[str], seen: tuple[Path, ...] = ()) -> Recipe:
    """Bases, then the recipe's own settings, then the overrides, validated; errors blame where each was given."""
    for item in overrides:
        if item.split("=", 1)[0].strip() == BASE_KEY:
            raise RecipeError(f"override '{item}': the base recipe is named in a recipe file (base: NAME), not on "
                              "the command line")  # fmt: skip
    layers = _with_bases(data, label, folder, seen)
    merged = {}
    for _, settings in layers:
        merged = _merge(merged, settings)
    merged = apply_overrides(copy.deepcopy(merged), overrides)
    bases = [name for name, _ in reversed(layers[:-1])]
    layers += [(f"override '{item}'", apply_overrides({}, [item])) for item in overrides]
    try:
        recipe = recipe_model().model_validate(merged)
    except ValidationError as e:
        raise RecipeError(_format_error(e, layers)) from None
    recipe._bases = bases
    return recipe


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (a path or a built-in name), with its bases and overrides, and validate it. A file
    without `name:` is named after itself. Raises RecipeError before any work starts."""
    path = resolve_recipe_path(name_or_path)
    data = _read_recipe_file(path)
    data.setdefault("name", path.stem)
    recipe = _build(data, str(path), path.parent, list(overrides or []), (path.resolve(),))
    recipe._file = path
    return recipe


def validate_recipe(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Recipe:
    """Validate recipe settings given as a dict (a `base:` is found from the working directory), then overrides."""
    return _build(data, source, Path.cwd(), list(overrides or []))
