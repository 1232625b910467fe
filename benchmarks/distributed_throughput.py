"""Training throughput of the default model in one process and on 2 ranks (DDP, FSDP, pipeline), via torchrun.

Every layout trains the default recipe's model (depth 3, seq 256, global batch 16, Muon, fp32, eager) on the
same shards for the same steps, and must give the same losses; what differs is how the work is split and what
the ranks exchange. On a 2-core CPU the comparison is 1 process x 2 threads against 2 processes x 1 thread: it
shows the cost of each layout's communication (gloo over loopback) and of running smaller matrix products,
not a speed-up, since both use the same two cores. MFU is against the fp32 matmul peak each run measures.

    python benchmarks/distributed_throughput.py [--steps 40] [--source stdlib-subdir]
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

LAYOUTS = {
    "1 process, 2 threads": (1, []),
    "DDP, 2 ranks": (2, ["parallel.data=ddp"]),
    "FSDP, 2 ranks": (2, ["parallel.data=fsdp"]),
    "FSDP, 2 ranks, keep gathered weights": (2, ["parallel.data=fsdp", "parallel.fsdp_reshard_after_forward=false"]),
    "pipeline, 2 stages, 1F1B x 4": (2, ["parallel.pipeline=2", "parallel.microbatches=4"]),
    "pipeline, 2 stages, GPipe x 4": (2, ["parallel.pipeline=2", "parallel.microbatches=4",
                                          "parallel.schedule=gpipe"]),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--source", default="email", help="standard-library package to train on")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    recipe = load_recipe(None, [f"data.source={stdlib_root() / a.source}", "data.val_fraction=0.1",
                                f"run_dir={work}", "name=d", "stages=[curate, tokenizer, shards]"])  # fmt: skip
    run_recipe(recipe)
    data = work / "d"
    settings = ["model.depth=3", "model.max_seq_len=256", "model.qk_norm=true", "model.zero_init_out=true",
                "train.seq_len=256", "train.batch_size=16", f"train.max_steps={a.steps}", "train.warmup_steps=5",
                "train.optimizer=muon", "train.compile=false", f"train.eval_every={a.steps}", "train.eval_batches=1",
                f"train.ckpt_every={a.steps}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    rows, reference = [], None
    for name, (nproc, extra) in LAYOUTS.items():
        out = work / name.replace(" ", "_").replace(",", "")
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                       if nproc > 1 else [])  # fmt: skip
        cmd = [*launcher, "-m", "lmforge.cli", "pretrain", str(data / "shards"), "-t",
               str(data / "tokenizer" / "tokenizer.json"), "-o", str(out), *settings, *extra]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steady = recs[3:]
        tok_s = statistics.median(r["tokens_per_s"] for r in steady)
        mfu = statistics.median(r["mfu"] for r in steady)
        losses = [r["loss"] for r in recs]
        if reference is None:
            reference = losses
        drift = max(abs(x - y) for x, y in zip(losses, reference))
        rows.append((name, tok_s, mfu, drift))
        print(f"{name:40s} {tok_s:10,.0f} tok/s  MFU {mfu:6.1%}  max |loss - 1 process| {drift:.1e}", flush=True)
    base = rows[0][1]
    print("\n| layout | tokens/s | vs 1 process | MFU | max loss difference |")
    print("|---|---:|---:|---:|---:|")
    for name, tok_s, mfu, drift in rows:
        print(f"| {name} | {tok_s:,.0f} | {tok_s / base:.2f}x | {mfu:.1%} | {drift:.1e} |")


if __name__ == "__main__":
    main()
