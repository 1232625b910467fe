"""Data the training tests share."""

import argparse
from pathlib import Path

import numpy as np


class ByteSplit:
    """Real text as tokens: the bytes of a standard-library source file (vocab 256)."""

    def __init__(self) -> None:
        self.tokens = np.frombuffer(Path(argparse.__file__).read_bytes(), dtype=np.uint8).astype(np.int64)
        self.n_tokens = len(self.tokens)

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


def json_package_run(root: Path) -> Path:
    """Curate, tokenizer (vocabulary 400) and token shards of the standard library's json package, in root/d."""
    from lmforge.data.readers import stdlib_root
    from lmforge.pipeline import run_recipe
    from lmforge.recipe import load_recipe

    recipe = load_recipe(None, [f"data.source={stdlib_root() / 'json'}", "data.val_fraction=0.3", "data.near_dedup=false",
                                "data.pii=false", "tokenizer.vocab_size=400", f"run_dir={root}", "name=d",
                                "stages=[curate, tokenizer, shards]"])  # fmt: skip
    run_recipe(recipe)
    return root / "d"
