"""torch.compile against eager for the default recipe's model, optimizer and batch, through the real loop.

    python benchmarks/compile_speed.py
    python benchmarks/compile_speed.py --smoke    # seconds: a depth-1 model, 6 steps each way

Trains 40 steps on random token ids (same FLOPs as text) each way and prints the median step time, the loop's
steady-state tokens/s and the wall time including compilation; the last line sums it up as key=value pairs.
--smoke checks that both paths still run (a depth-1 model, vocabulary 512, batch 2 x 32, one thread; its figures
mean nothing).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.loader import BatchLoader
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import clm_loss
from lmforge.recipe import Recipe, load_recipe
from lmforge.train.loop import train

STEPS = 40
# One thread: a smoke run shares the machine with the test suite, and tiny ops on two oversubscribed threads crawl.
SMOKE = ["model.depth=1", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=2", "tokenizer.vocab_size=512",
         "train.threads=1"]  # fmt: skip
SMOKE_STEPS = 6
STEADY_FROM = 4  # compilation and allocator warm-up happen in the first steps


class RandomTokens:
    def __init__(self, vocab_size: int) -> None:
        self.tokens = np.random.default_rng(0).integers(0, vocab_size, 2_000_000)
        self.n_tokens = len(self.tokens)

    def slice(self, a: int, b: int) -> np.ndarray:
        return self.tokens[a:b]


def measure(r: Recipe, steps: int, compile_: bool) -> tuple[float, float, float]:
    """(median step seconds, steady tokens/s, wall seconds) of `steps` training steps."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_config(r.model, r.tokenizer.vocab_size))
    cfg = r.train.model_copy(update=dict(max_steps=steps, compile=compile_, eval_every=10_000,
                                         ckpt_every=10_000, warmup_steps=2))  # fmt: skip
    loader = BatchLoader(RandomTokens(r.tokenizer.vocab_size), cfg.seq_len, cfg.batch_size, 0)
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        out = train(model, clm_loss, loader, cfg, Path(d))
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    step_s = sorted(cfg.batch_size * cfg.seq_len / rec["tokens_per_s"] for rec in records[STEADY_FROM:])
    return step_s[len(step_s) // 2], out["tokens_per_s"], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds on a tiny model: does it still run?")
    a = ap.parse_args()
    r = load_recipe(None, SMOKE if a.smoke else [])
    steps = SMOKE_STEPS if a.smoke else STEPS
    summary = []
    for compile_, key in ((False, "eager"), (True, "compiled")):
        step, tok_s, wall = measure(r, steps, compile_)
        print(f"compile={compile_}: median step {step * 1000:.0f} ms, steady {tok_s:.0f} tokens/s, "
              f"wall {wall:.1f} s for {steps} steps")  # fmt: skip
        summary += [f"{key}_step_ms={step * 1000:.0f}", f"{key}_tokens_per_s={tok_s:.0f}", f"{key}_wall_s={wall:.1f}"]
    print(" ".join(summary))


if __name__ == "__main__":
    main()
