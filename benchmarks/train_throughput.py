"""Training throughput and MFU of lmforge's training loop on this machine.

    python benchmarks/train_throughput.py                 # the default recipe's model, batch and seq_len
    python benchmarks/train_throughput.py --sweep         # a table over depth, width, seq_len and batch size
    python benchmarks/train_throughput.py --depth 6 --batch-size 32 --seq-len 512 --steps 40
    python benchmarks/train_throughput.py --smoke         # seconds: a tiny eager model, to check the script runs

Each configuration runs the real loop (`lmforge.train.loop.train`: forward, backward, clipping, fused AdamW,
metrics) on random token ids, which cost the same FLOPs as text. Throughput is the loop's steady-state figure
(first steps, checkpoint and evaluation excluded); MFU is against fp32 square-matmul FLOP/s measured in the same
process. tokens/s is the median step's (a neighbour's burst on a shared machine slows a few steps a lot);
(mean) is the loop's own steady-state figure. "Mtok/6min" is how many tokens six minutes of training reach,
"recipe min" how long the recipe's max_steps take at that batch size. The last line sums up the first
configuration as key=value pairs. --smoke: depth 1, width 64, seq 32, batch 2, 6 steps, eager, one thread, a 0.3 s
peak measurement (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.loader import BatchLoader
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.objectives import clm_loss
from lmforge.recipe import load_recipe
from lmforge.train.flops import measure_peak_flops
from lmforge.train.loop import METRICS_FILE, STEADY_AFTER, train
from lmforge.device import resolve_device, set_threads

VOCAB = load_recipe().tokenizer.vocab_size

# (depth, d_model or None for the 64 x depth dial, seq_len, batch_size)
SWEEP = [
    (2, 256, 256, 16),
    (3, None, 256, 16),
    (4, None, 256, 8),
    (4, None, 256, 32),
    (4, None, 512, 8),
    (5, None, 256, 16),
    (6, None, 256, 16),
    (4, 384, 256, 16),
    (4, 512, 256, 16),
]
# --smoke: (depth, d_model, seq_len, batch_size), steps, settings, seconds of peak measurement
# (one thread: a smoke run shares the machine with the test suite, and tiny ops on oversubscribed threads crawl)
SMOKE = ((1, 64, 32, 2), 6, ["train.compile=false", "train.threads=1"], 0.3)


class RandomTokens:
    def __init__(self, n_tokens: int, seed: int = 0) -> None:
        self.tokens = np.random.default_rng(seed).integers(0, VOCAB, size=n_tokens, dtype=np.int64)
        self.n_tokens = n_tokens

    def slice(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


@dataclass
class Result:
    depth: int
    d_model: int
    seq_len: int
    batch_size: int
    params: int
    flops_per_token: float
    tokens_per_s: float
    achieved: float
    peak: float
    recipe_minutes: float
    mean_tokens_per_s: float

    @property
    def mfu(self) -> float:
        return self.achieved / self.peak


def measure(depth: int, d_model: int | None, seq_len: int, batch_size: int, steps: int,
            settings: tuple[str, ...] = ()) -> Result:  # fmt: skip
    recipe = load_recipe(overrides=[f"model.depth={depth}", f"model.max_seq_len={max(seq_len, 256)}",
                                    f"train.seq_len={seq_len}", f"train.batch_size={batch_size}",
                                    *([f"model.d_model={d_model}"] if d_model else []), *settings])  # fmt: skip
    args = ModelArgs.from_config(recipe.model, VOCAB)
    torch.manual_seed(0)
    model = Transformer(args)
    flops_per_token = model.flops_per_token(seq_len)
    cfg = recipe.train.model_copy(update={"max_steps": steps, "ckpt_every": steps, "keep_last": 1})
    loader = BatchLoader(RandomTokens(steps * batch_size * seq_len + 1), seq_len, batch_size, seed=0)
    with tempfile.TemporaryDirectory() as out:
        metrics = train(model, clm_loss, loader, cfg, Path(out), flops_per_token=flops_per_token,
                        tokens_per_batch=batch_size * seq_len * cfg.grad_accum)  # fmt: skip
        records = [json.loads(line) for line in (Path(out) / METRICS_FILE).read_text().splitlines()]
    # The median step, not the mean: on a shared machine a neighbour's burst slows a few steps a lot.
    tokens_per_s = float(np.median([r["tokens_per_s"] for r in records[STEADY_AFTER:]]))
    recipe_tokens = recipe.train.max_steps * batch_size * seq_len * recipe.train.grad_accum
    return Result(depth, args.d_model, seq_len, batch_size, model.num_params(), flops_per_token, tokens_per_s,
                  tokens_per_s * flops_per_token, metrics["peak_flops"], recipe_tokens / tokens_per_s / 60,
                  metrics["tokens_per_s"])  # fmt: skip


def print_table(results: list[Result]) -> None:
    header = (f"{'depth':>5} {'d_model':>7} {'seq':>4} {'batch':>5} {'params':>8} {'MFLOP/tok':>9} "
              f"{'tokens/s':>9} {'(mean)':>8} {'GFLOP/s':>8} {'peak':>7} {'MFU':>6} {'Mtok/6min':>9} "
              f"{'recipe min':>10}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.depth:>5} {r.d_model:>7} {r.seq_len:>4} {r.batch_size:>5} {r.params / 1e6:>7.2f}M "
              f"{r.flops_per_token / 1e6:>9.1f} {r.tokens_per_s:>9,.0f} {r.mean_tokens_per_s:>8,.0f} "
              f"{r.achieved / 1e9:>8.1f} {r.peak / 1e9:>7.1f} {r.mfu:>6.1%} {r.tokens_per_s * 360 / 1e6:>9.2f} "
              f"{r.recipe_minutes:>10.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="measure the built-in table of configurations")
    parser.add_argument("--depth", type=int, help="model depth (default: the recipe's)")
    parser.add_argument("--d-model", type=int, help="width (default: 64 x depth)")
    parser.add_argument("--seq-len", type=int, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--steps", type=int, help="training steps per configuration (default 40, 12 in a sweep)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the training loop's log")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on a tiny model: does it still run?")
    opts = parser.parse_args()
    smoke_config, smoke_steps, settings, peak_seconds = SMOKE if opts.smoke else (None, None, [], 2.0)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, format="%(message)s")

    recipe = load_recipe(overrides=settings)
    set_threads(recipe.train.threads)
    device = resolve_device(recipe.train.device)
    peak = measure_peak_flops(device, torch.float32, seconds=peak_seconds)
    print(f"device {device}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"recipe max_steps {recipe.train.max_steps}")  # fmt: skip
    default = (opts.depth or recipe.model.depth, opts.d_model or recipe.model.d_model,
               opts.seq_len or recipe.train.seq_len, opts.batch_size or recipe.train.batch_size)  # fmt: skip
    default = smoke_config or default
    configs = [default] + [c for c in SWEEP if c != default] if opts.sweep else [default]
    steps = opts.steps or smoke_steps or (12 if opts.sweep else 40)
    results = []
    for config in configs:
        results.append(measure(*config, steps=steps, settings=tuple(settings)))
        if opts.sweep:
            print_table(results[-1:])
    if opts.sweep:
        print()
    print_table(results)
    r = results[0]
    print(f"tokens_per_s={r.tokens_per_s:.0f} mfu={r.mfu:.3f} peak_gflops={r.peak / 1e9:.1f} params={r.params}")


if __name__ == "__main__":
    main()
