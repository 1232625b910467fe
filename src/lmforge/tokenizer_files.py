"""The files beside an imported model's tokenizer.json that say what its special tokens, stop ids and chat template
are, read the way transformers reads them.

    tokenizer_config.json    bos_token / eos_token / pad_token / unk_token (a string, or {"content": ...}; null or
                             absent: the model has none) and chat_template (a string, or a list of
                             {"name", "template"} of which "default" is used)
    special_tokens_map.json  the same token keys, used where tokenizer_config.json does not name them
    generation_config.json   eos_token_id: an int or a list (every id that ends a generation)
    chat_template.jinja      the template as its own file (newer transformers): it takes precedence
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
# What `Tokenizer.from_dir` reads and `Tokenizer.save_dir` writes back (each only where it exists).
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")  # fmt: skip
_TOKEN_KEYS = ("bos", "eos", "pad", "unk")


@dataclass(frozen=True)
class Imported:
    """What an imported tokenizer's files say beyond tokenizer.json."""

    source: Path  # the directory it was read from, for messages
    files: dict[str, str]  # every file read, by name, exactly as read: what `Tokenizer.save_dir` writes back
    bos: str | None
    eos: str | None
    pad: str | None
    unk: str | None
    generation_eos: tuple[int, ...]
    chat_template: str | None
    no_template_reason: str = "it has no chat_template in tokenizer_config.json and no chat_template.jinja"


def read_imported(tokenizer_json: Path) -> Imported:
    """The special tokens, generation eos ids and chat template of the tokenizer at `tokenizer_json`, from the
    files beside it (see the module docstring); a file that is not valid JSON is named in the error."""
    dir = tokenizer_json.parent
    files = {TOKENIZER_JSON: tokenizer_json.read_text(encoding="utf-8")}
    files |= {name: (dir / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES[1:] if (dir / name).is_file()}
    config, special_map, generation = (_json(dir / n, files.get(n)) for n in TOKENIZER_FILES[1:4])
    tokens = {k: _token(config[f"{k}_token"] if f"{k}_token" in config else special_map.get(f"{k}_token"))
              for k in _TOKEN_KEYS}  # fmt: skip
    eos_ids = generation.get("eos_token_id")
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    template, reason = _chat_template(config, files.get("chat_template.jinja"))
    return Imported(source=dir, files=files, **tokens, generation_eos=tuple(int(i) for i in eos_ids),
                    chat_template=template, **({"no_template_reason": reason} if reason else {}))  # fmt: skip


def _json(path: Path, text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token(value: Any) -> str | None:
    """A special token's text: tokenizer_config.json writes a string or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(config: dict[str, Any], jinja_file: str | None) -> tuple[str | None, str | None]:
    """(the template, why there is none)."""
    if jinja_file is not None:
        return jinja_file, None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], None
        return None, f"tokenizer_config.json lists chat templates {sorted(map(str, named))} but none named 'default'"
    return (template, None) if isinstance(template, str) and template else (None, None)
