"""Learning per second: lmforge's modern recipes (Muon + modern blocks) against the classic GPT-2 recipe.

    python benchmarks/recipe_efficiency.py                    # 240 s of training each, depth 3
    python benchmarks/recipe_efficiency.py --budget 120 --recipes gpt2,default --reuse
    python benchmarks/recipe_efficiency.py --smoke            # seconds: tiny models on the json package

Recipes: `gpt2` (LayerNorm, learned positions, GELU, tied embeddings, AdamW), `modern` (RMSNorm, rotary,
QK-norm, squared ReLU, untied head, zero-initialised outputs, logit soft-capping, Muon) and `default` (what the
default recipe trains: the modern block within what Hugging Face can load - SwiGLU, QK-norm, zero-initialised
outputs, untied head - with Muon). All train on the same data (the default recipe's curated standard library, its
tokenizer and shards, built once into runs/bench-efficiency) for the same wall-clock budget on this machine,
through the real pretrain stage. Each run first times steady-state steps to turn the budget into a step count,
so its learning-rate schedule ends when the budget does. Validation loss (nats per token, the same fixed held-out
windows for all) is measured at regular steps; the time axis is training time only (evaluation excluded).

Printed: the validation curves, each recipe's final loss, and the training time each recipe needs to reach the
GPT-2 recipe's final loss (linear interpolation between evaluations) as a fraction of GPT-2's own time.
The last line sums it up as key=value pairs.

--smoke checks that the benchmark still runs: the standard library's json package (400-token vocabulary) in a
temporary folder, depth 1, batch 4 x 64, one thread, a 0.2 s budget (at least 20 steps), 2 evaluation batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from lmforge.data.readers import stdlib_root
from lmforge.pipeline import run_recipe
from lmforge.pretrain import pretrain
from lmforge.model.config import ModelConfig
from lmforge.recipe import load_recipe
from lmforge.train.config import TrainConfig

RECIPES = {
    # The classic: LayerNorm, learned positions, GELU MLP, tied embeddings, AdamW with warmup and cosine decay.
    "gpt2": (dict(arch="gpt2", tie_embeddings=True), dict(optimizer="adamw")),
    # lmforge's modern default: RMSNorm, rotary, QK-norm, squared-ReLU MLP, untied head, zero-initialised output
    # projections, logit soft-capping; Muon on the hidden matrices, AdamW on embeddings, head and norms.
    "modern": (dict(arch="llama", mlp="relu2", qk_norm=True, logit_softcap=15.0, zero_init_out=True,
                    tie_embeddings=False), dict(optimizer="muon")),  # fmt: skip
    # The default recipe's model: the modern block restricted to what Hugging Face can load (Qwen3 layout), so the
    # default run's export stage works: SwiGLU, QK-norm, zero-initialised outputs, untied head; Muon.
    "default": (dict(arch="llama", mlp="swiglu", qk_norm=True, zero_init_out=True, tie_embeddings=False),
                dict(optimizer="muon")),  # fmt: skip
}
# --smoke: data settings, training settings, budget in seconds, depth
SMOKE_DATA = [f"data.source={stdlib_root() / 'json'}", "data.val_fraction=0.3", "data.near_dedup=false",
              "data.pii=false", "tokenizer.vocab_size=400"]  # fmt: skip
# One thread: a smoke run shares the machine with the test suite, and tiny ops on oversubscribed threads crawl.
SMOKE_TRAIN = ["model.max_seq_len=64", "train.seq_len=64", "train.batch_size=4", "train.eval_batches=2",
               "train.threads=1"]  # fmt: skip
SMOKE_BUDGET, SMOKE_DEPTH = 0.2, 1


def prepare_data(root: Path, settings: list[str]) -> Path:
    """Curate, tokenize and shard the default recipe's data once; later calls find the stages up to date."""
    recipe = load_recipe(None, [f"run_dir={root}", "name=data", "stages=[curate, tokenizer, shards]", *settings])
    run_recipe(recipe)
    return root / "data"


def curve(out: Path) -> list[tuple[float, int, float]]:
    """(training seconds, step, val_loss) at each evaluation, from the loop's metrics.jsonl.

    A step's duration is its tokens over its tokens/s, so evaluation time is not counted.
    """
    points, seconds, tokens = [], 0.0, 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("tokens_per_s"):
            seconds += (r["tokens"] - tokens) / r["tokens_per_s"]
        tokens = r["tokens"]
        if r.get("val_loss") is not None:
            points.append((seconds, r["step"], r["val_loss"]))
    return points


def time_to_reach(points: list[tuple[float, int, float]], target: float) -> float | None:
    """First training time at which the curve reaches `target`, interpolating between evaluations."""
    prev = (0.0, None)
    for seconds, _, loss in points:
        if loss <= target:
            t0, l0 = prev
            if l0 is None or l0 == loss:
                return seconds
            return t0 + (seconds - t0) * (l0 - target) / (l0 - loss)
        prev = (seconds, loss)
    return None


def train_one(name: str, data: Path, out_root: Path, budget: float, depth: int, lr: float, reuse: bool,
              settings: list[str]) -> list:  # fmt: skip
    model_kw, train_kw = RECIPES[name]
    base = load_recipe(None, settings)
    model_cfg = ModelConfig(**{**base.model.model_dump(), "depth": depth, **model_kw})
    # Eager for every recipe, as measured in docs/benchmarks.md; compile helps each by a similar margin on CPU.
    common = {**base.train.model_dump(), "lr": lr, "compile": False, **train_kw}
    shards, tok = data / "shards", data / "tokenizer" / "tokenizer.json"
    # Time a few steps (after warm-up) to size the schedule to the budget.
    probe = out_root / f"{name}-probe"
    shutil.rmtree(probe, ignore_errors=True)
    steps_probe = 8
    cfg = TrainConfig(**{**common, "max_steps": steps_probe, "warmup_steps": 1, "eval_every": 10_000,
                         "ckpt_every": 10_000})  # fmt: skip
    m = pretrain(shards, tok, model_cfg, cfg, probe)
    step_seconds = cfg.batch_size * cfg.seq_len / m["tokens_per_s"]  # steady-state steps, warm-up excluded
    max_steps = max(20, int(budget / step_seconds))
    out = out_root / name
    settings = {"model": model_cfg.model_dump(), "budget": budget}
    if reuse and (out / "final").exists() and (out / "settings.json").exists():
        if json.loads((out / "settings.json").read_text()) == settings:
            print(f"{name}: reusing the finished run in {out}", flush=True)
            return curve(out)
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(**{**common, "max_steps": max_steps, "warmup_steps": max(1, max_steps // 20),
                         "eval_every": max(1, max_steps // 12), "ckpt_every": max_steps})  # fmt: skip
    start = time.perf_counter()
    pretrain(shards, tok, model_cfg, cfg, out)
    # Written after training: pretrain writes only into a folder it owns, and a run cut short is not reused.
    (out / "settings.json").write_text(json.dumps(settings))
    print(f"{name}: {max_steps} steps in {time.perf_counter() - start:.0f} s wall "
          f"(probe: {step_seconds * 1000:.0f} ms/step)", flush=True)  # fmt: skip
    return curve(out)


def report(curves: dict[str, list], names: list[str], budget: float, depth: int) -> None:
    print("\n| recipe | training s | step | val loss |\n|---|---:|---:|---:|")
    for name, points in curves.items():
        for seconds, step, loss in points:
            print(f"| {name} | {seconds:.1f} | {step} | {loss:.4f} |")
    base_final, base_time = curves["gpt2"][-1][2], curves["gpt2"][-1][0]
    print(f"\ngpt2 final val loss {base_final:.4f} after {base_time:.0f} s of training")
    summary = [f"gpt2_final={base_final:.4f}"]
    for name in names[1:]:
        final = curves[name][-1][2]
        reach = time_to_reach(curves[name], base_final)
        ratio = None if reach is None else reach / base_time
        if reach is None:
            print(f"{name}: final {final:.4f}; never reached {base_final:.4f}")
        else:
            print(f"{name}: final {final:.4f}; reached {base_final:.4f} after {reach:.0f} s = {ratio:.2f} x gpt2's time")
        summary += [f"{name}_final={final:.4f}", f"{name}_time_ratio={None if ratio is None else round(ratio, 3)}"]
    print(" ".join(summary + [f"budget_s={budget:g}", f"depth={depth}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per recipe")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (both recipes)")
    parser.add_argument("--root", type=Path, default=Path("runs/bench-efficiency"))
    parser.add_argument("--recipes", default="gpt2,modern,default", help="comma-separated, gpt2 first")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs with the same settings")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on tiny models: does it still run?")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = args.recipes.split(",")
    if names[0] != "gpt2" or any(n not in RECIPES for n in names):
        parser.error(f"--recipes must start with gpt2 and name recipes among {list(RECIPES)}")
    if args.smoke:
        args.budget, args.depth = SMOKE_BUDGET, SMOKE_DEPTH
        with tempfile.TemporaryDirectory() as tmp:
            data = prepare_data(Path(tmp), SMOKE_DATA)
            curves = {n: train_one(n, data, Path(tmp), args.budget, args.depth, args.lr, False, SMOKE_TRAIN)
                      for n in names}  # fmt: skip
    else:
        data = prepare_data(args.root, [])
        curves = {n: train_one(n, data, args.root, args.budget, args.depth, args.lr, args.reuse, []) for n in names}
    report(curves, names, args.budget, args.depth)


if __name__ == "__main__":
    main()
