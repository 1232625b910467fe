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


def make_chain(model, chain: dict[int, int]):
    """Rewire `model` in place so its greedy choice after token t is chain[t], and return it: both residual
    branches are zeroed, so the last hidden state is the normalised embedding of the current token, and each
    lm_head row points at its predecessor's embedding (the model needs init_std large enough to separate them)."""
    import torch

    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        emb = model.model.embed_tokens.weight
        for t, nxt in chain.items():
            model.lm_head.weight[nxt] += 10 * emb[t] / emb[t].norm()
    return model
