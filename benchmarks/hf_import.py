"""Loading Hugging Face models: lmforge's load_hf_model against transformers' from_pretrained.

    nice -n 10 python benchmarks/hf_import.py                   # every architecture tiny; qwen2 and gpt2 at ~0.5B
    nice -n 10 python benchmarks/hf_import.py --large-archs all  # every architecture at ~0.5B too (~8 minutes)
    nice -n 10 python benchmarks/hf_import.py --archs qwen2 --shapes tiny   # seconds

The default run measures the two loading paths at ~0.5B, memory-mapped as stored (qwen2; llama, qwen3 and mistral
load the same way) and GPT-2's transposed and split Conv1D weights, and stays under about 5 minutes on 2 cores.

For each architecture (llama with llama3 rope scaling, qwen2, qwen3, mistral, gpt2) and shape (tiny, and ~0.5B:
Qwen2.5-0.5B's for the llama family, a 24-layer 1280-wide GPT-2), transformers builds a random-initialised model
and saves it (safetensors) in bf16 and fp32. Each measurement then runs in a fresh process, so that its peak
resident memory (getrusage ru_maxrss) is its own:

- "load s": wall time of `load_hf_model(dir)` or `AutoModelForCausalLM.from_pretrained(dir, dtype=...)` (the same
  dtype as stored), imports excluded;
- "peak MB": the process's peak resident memory once loaded; "load MB" its growth during the load (imports
  excluded). Memory-mapped weights count once their pages are read. The parent process never imports torch and
  builds each model in a child of its own: a child's ru_maxrss starts from its parent's (Linux keeps the high-water
  mark across fork and exec), so a parent holding a model would hide the children's figures;
- "max |diff|": (fp32 only) the largest absolute difference between the two models' logits on 2 x 64 tokens.

The last line sums up: max_logit_diff (over the fp32 runs), and load_time_ratio and peak_rss_ratio, lmforge over
transformers, summed over all runs (so the large models weigh most). Targets: diff <= 1e-4, both ratios <= 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # fmt: skip
# Qwen2.5-0.5B's shape (494M parameters with its tied 151936-token embeddings) for the llama family.
HALF_B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768)  # fmt: skip
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
SHAPES = {"tiny": TINY, "0.5b": HALF_B}
GPT2_SHAPES = {"tiny": dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=1024),
               "0.5b": dict(vocab_size=50_257, n_embd=1280, n_layer=24, n_head=20, n_positions=1024)}  # fmt: skip
# architecture -> (transformers config class, its fields beyond the shape)
ARCHS = {
    "llama": ("LlamaConfig", {"rope_parameters": {**LLAMA3, "rope_theta": 500_000.0},
                              "max_position_embeddings": 131_072}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 64, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gpt2": ("GPT2Config", {}),
}  # fmt: skip
DTYPES = ("float32", "bfloat16")  # fp32 first: the bf16 copy is made by converting the model in place


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load(loader: str, directory: str, dtype: str) -> torch.nn.Module:
    import torch

    if loader == "lmforge":
        from lmforge.model.hf_import import load_hf_model

        return load_hf_model(Path(directory))[0]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))


def child(task: str, directory: str, dtype: str) -> dict:
    """One measurement, in its own process: a loader's time and memory, or ("diff") both models' logits."""
    import torch

    torch.set_num_threads(2)
    if task == "diff":
        from lmforge.model.hf_import import load_hf_model  # noqa: F401  (imports before the loads, like below)

        ours, theirs = _load("lmforge", directory, dtype).eval(), _load("transformers", directory, dtype).eval()
        vocab = ours.args.vocab_size
        ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return {"diff": (ours(ids).float() - theirs(ids).logits.float()).abs().max().item()}
    if task == "lmforge":
        import lmforge.model.hf_import  # noqa: F401
    else:
        import transformers  # noqa: F401
    before = _peak_mb()
    start = time.perf_counter()
    model = _load(task, directory, dtype)
    seconds = time.perf_counter() - start
    assert str(next(model.parameters()).dtype) == f"torch.{dtype}"
    return {"seconds": seconds, "peak_mb": _peak_mb(), "load_mb": _peak_mb() - before}


def run_child(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], check=True, capture_output=True, text=True,
                         cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(arch: str, shape: str, root: str) -> dict[str, str]:
    """Random-initialised transformers model of `arch` at `shape`, saved in every dtype: dtype -> directory."""
    import torch
    import transformers

    config_cls, extra = ARCHS[arch]
    base = GPT2_SHAPES[shape] if arch == "gpt2" else SHAPES[shape]
    config = getattr(transformers, config_cls)(**(base | extra if shape == "0.5b" else base | {
        k: v for k, v in extra.items() if k != "max_position_embeddings"}))  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    dirs = {}
    for dtype in DTYPES:
        dirs[dtype] = str(Path(root) / f"{arch}-{shape}-{dtype}")
        model.to(getattr(torch, dtype)).save_pretrained(dirs[dtype])
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of tiny, 0.5b")
    parser.add_argument("--large-archs", default="qwen2,gpt2", help="the architectures measured at 0.5b, or all")
    parser.add_argument("--smoke", action="store_true", help="tiny llama only (the test suite's check)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.smoke:
        opts.archs, opts.shapes = "llama", "tiny"
    if opts.child:
        task, *argv = opts.child
        print(json.dumps(build(*argv) if task == "build" else child(task, *argv)))
        return
    rows, sums = [], {"ours_s": 0.0, "theirs_s": 0.0, "ours_mb": 0.0, "theirs_mb": 0.0}
    max_diff, worst_time, worst_rss = 0.0, 0.0, 0.0  # the largest per-model ratios, beside the summed ones
    print(f"{'model':<22} {'dtype':<9} {'lmforge s':>9} {'hf s':>7} {'lmforge peak MB':>15} {'hf peak MB':>10} "
          f"{'lmforge load MB':>15} {'hf load MB':>10} {'max |diff|':>10}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hf_import_bench_") as tmp:
        for shape in opts.shapes.split(","):
            large = ARCHS if opts.large_archs == "all" else opts.large_archs.split(",")
            for arch in [a for a in opts.archs.split(",") if shape == "tiny" or a in large]:
                dirs = run_child("build", arch, shape, tmp)
                for dtype, directory in dirs.items():
                    ours, theirs = run_child("lmforge", directory, dtype), run_child("transformers", directory, dtype)
                    diff = run_child("diff", directory, dtype)["diff"] if dtype == "float32" else None
                    if diff is not None:
                        max_diff = max(max_diff, diff)
                    sums["ours_s"] += ours["seconds"]
                    sums["theirs_s"] += theirs["seconds"]
                    sums["ours_mb"] += ours["peak_mb"]
                    sums["theirs_mb"] += theirs["peak_mb"]
                    worst_time = max(worst_time, ours["seconds"] / theirs["seconds"])
                    worst_rss = max(worst_rss, ours["peak_mb"] / theirs["peak_mb"])
                    row = (f"{arch + ' ' + shape:<22} {dtype:<9} {ours['seconds']:>9.3f} {theirs['seconds']:>7.3f} "
                           f"{ours['peak_mb']:>15.0f} {theirs['peak_mb']:>10.0f} {ours['load_mb']:>15.0f} "
                           f"{theirs['load_mb']:>10.0f} {'' if diff is None else f'{diff:.2e}':>10}")  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
                    shutil.rmtree(directory)
    print(f"worst_load_time_ratio={worst_time:.3f} worst_peak_rss_ratio={worst_rss:.3f} "  # the keys last
          f"max_logit_diff={max_diff:.2e} load_time_ratio={sums['ours_s'] / sums['theirs_s']:.3f} "
          f"peak_rss_ratio={sums['ours_mb'] / sums['theirs_mb']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
