"""torch.compile against eager for the default recipe's model, optimizer and batch, through the real loop.

    python benchmarks/compile_speed.py

Trains 40 steps on random token ids (same FLOPs as text) each way and prints the median step time, the loop's
steady-state tokens/s and the wall time including compilation.
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.loader import BatchLoader
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import clm_loss
from lmforge.recipe import load_recipe
from lmforge.train.loop import train

r = load_recipe()
STEPS = 40


class RandomTokens:
    def __init__(self) -> None:
        self.tokens = np.random.default_rng(0).integers(0, r.tokenizer.vocab_size, 2_000_000)
        self.n_tokens = len(self.tokens)

    def slice(self, a: int, b: int) -> np.ndarray:
        return self.tokens[a:b]


def main() -> None:
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelArgs.from_config(r.model, r.tokenizer.vocab_size))
        cfg = r.train.model_copy(update=dict(max_steps=STEPS, compile=compile_, eval_every=10_000,
                                             ckpt_every=10_000, warmup_steps=2))  # fmt: skip
        loader = BatchLoader(RandomTokens(), cfg.seq_len, cfg.batch_size, 0)
        with tempfile.TemporaryDirectory() as d:
            start = time.perf_counter()
            out = train(model, clm_loss, loader, cfg, Path(d))
            wall = time.perf_counter() - start
            records = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        # Steps after the first four: compilation and allocator warm-up happen there.
        steps = sorted(cfg.batch_size * cfg.seq_len / rec["tokens_per_s"] for rec in records[4:])
        print(f"compile={compile_}: median step {steps[len(steps) // 2] * 1000:.0f} ms, "
              f"steady {out['tokens_per_s']:.0f} tokens/s, wall {wall:.1f} s for {STEPS} steps")  # fmt: skip


if __name__ == "__main__":
    main()
