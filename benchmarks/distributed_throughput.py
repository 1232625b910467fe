"""Training throughput of the default model in one process and on 2 ranks (DDP, FSDP, pipeline), via torchrun.

Every layout trains the default recipe's model (depth 3, seq 256, global batch 16, Muon, fp32, eager) on the
same shards for the same steps, and must give the same losses; what differs is how the work is split and what
the ranks exchange. On a 2-core CPU the comparison is 1 process x 2 threads against 2 processes x 1 thread: it
shows the cost of each layout's communication (gloo over loopback) and of running smaller matrix products,
not a speed-up, since both use the same two cores. MFU is against the fp32 matmul peak each run measures.
The last line sums it up as key=value pairs.

    python benchmarks/distributed_throughput.py [--steps 40] [--source stdlib-subdir]
    python benchmarks/distributed_throughput.py --smoke    # seconds: a depth-2 model on the json package, 1 and 2 ranks

--smoke checks that the launch still works: the standard library's json package with a 400-token vocabulary, a
depth-2 model, batch 4 x 64, 5 steps, one thread per process, in one process and as DDP on 2 gloo ranks (its
figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.data.readers import stdlib_root
from lmforge.pipeline import run_recipe
from lmforge.recipe import load_recipe

# name: (key in the summary line, processes, settings)
LAYOUTS = {
    "1 process, 2 threads": ("single", 1, []),
    "DDP, 2 ranks": ("ddp", 2, ["parallel.data=ddp"]),
    "FSDP, 2 ranks": ("fsdp", 2, ["parallel.data=fsdp"]),
    "FSDP, 2 ranks, keep gathered weights": ("fsdp_keep", 2, ["parallel.data=fsdp",
                                                              "parallel.fsdp_reshard_after_forward=false"]),
    "pipeline, 2 stages, 1F1B x 4": ("pp_1f1b", 2, ["parallel.pipeline=2", "parallel.microbatches=4"]),
    "pipeline, 2 stages, GPipe x 4": ("pp_gpipe", 2, ["parallel.pipeline=2", "parallel.microbatches=4",
                                                      "parallel.schedule=gpipe"]),
}  # fmt: skip
SMOKE_LAYOUTS = ("1 process, 2 threads", "DDP, 2 ranks")
SMOKE_STEPS = 5
STEADY_FROM = 3  # metrics records before this one are warm-up


def prepare_data(work: Path, source: str, smoke: bool) -> Path:
    """Curate, tokenize and shard a standard-library package into work/d."""
    small = ["data.near_dedup=false", "data.pii=false", "tokenizer.vocab_size=400"] if smoke else []
    recipe = load_recipe(None, [f"data.source={stdlib_root() / source}", "data.val_fraction=0.1", f"run_dir={work}",
                                "name=d", "stages=[curate, tokenizer, shards]", *small])  # fmt: skip
    run_recipe(recipe)
    return work / "d"


def train_settings(steps: int, smoke: bool) -> list[str]:
    seq, batch, depth = (64, 4, 2) if smoke else (256, 16, 3)
    # One thread per process in a smoke run: it shares the machine with the test suite.
    threads = ["train.threads=1"] if smoke else []
    return [*threads, f"model.depth={depth}", f"model.max_seq_len={seq}", "model.qk_norm=true",
            "model.zero_init_out=true",
            f"train.seq_len={seq}", f"train.batch_size={batch}", f"train.max_steps={steps}", "train.warmup_steps=5",
            "train.optimizer=muon", "train.compile=false", f"train.eval_every={steps}", "train.eval_batches=1",
            f"train.ckpt_every={steps}"]  # fmt: skip


def run_layout(data: Path, out: Path, nproc: int, settings: list[str]) -> list[dict]:
    """Train one layout in fresh processes and return its metrics records."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                   if nproc > 1 else [])  # fmt: skip
    cmd = [*launcher, "-m", "lmforge.cli", "pretrain", str(data / "shards"), "-t",
           str(data / "tokenizer" / "tokenizer.json"), "-o", str(out), *settings]  # fmt: skip
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit status {done.returncode}:\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--source", default="email", help="standard-library package to train on")
    ap.add_argument("--smoke", action="store_true", help="a few seconds on a tiny model: does it still run?")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.source = SMOKE_STEPS, "json"
    layouts = {k: LAYOUTS[k] for k in SMOKE_LAYOUTS} if a.smoke else LAYOUTS
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(work, a.source, a.smoke)
        settings = train_settings(a.steps, a.smoke)
        rows, reference = [], None
        for name, (key, nproc, extra) in layouts.items():
            recs = run_layout(data, work / key, nproc, settings + extra)
            steady = recs[STEADY_FROM:]
            tok_s = statistics.median(r["tokens_per_s"] for r in steady)
            mfu = statistics.median(r["mfu"] for r in steady)
            losses = [r["loss"] for r in recs]
            if reference is None:
                reference = losses
            drift = max(abs(x - y) for x, y in zip(losses, reference))
            rows.append((name, key, tok_s, mfu, drift))
            print(f"{name:40s} {tok_s:10,.0f} tok/s  MFU {mfu:6.1%}  max |loss - 1 process| {drift:.1e}", flush=True)
    base = rows[0][2]
    print("\n| layout | tokens/s | vs 1 process | MFU | max loss difference |")
    print("|---|---:|---:|---:|---:|")
    for name, _, tok_s, mfu, drift in rows:
        print(f"| {name} | {tok_s:,.0f} | {tok_s / base:.2f}x | {mfu:.1%} | {drift:.1e} |")
    summary = [f"steps={a.steps}"]
    for i, (_, key, tok_s, mfu, drift) in enumerate(rows):
        summary += [f"{key}_tokens_per_s={tok_s:.0f}", f"{key}_mfu={mfu:.3f}"]
        summary += [f"{key}_vs_single={tok_s / base:.2f}", f"{key}_max_loss_diff={drift:.1e}"] if i else []
    print(" ".join(summary))


if __name__ == "__main__":
    main()
