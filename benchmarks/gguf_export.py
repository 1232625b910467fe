"""GGUF export: file size, export time and, through llama.cpp, the logit error of f32 / f16 / q8_0 files.

    python benchmarks/gguf_export.py                                       # random-init depth-12 model (~100M)
    python benchmarks/gguf_export.py --checkpoint runs/stdlib-code/pretrain/final   # a trained model
    python benchmarks/gguf_export.py --smoke                               # seconds: a tiny model

Each dtype is exported once (`lmforge.export_gguf.export_gguf`, wall time including loading the checkpoint). With
llama-cpp-python installed, llama.cpp then runs each file on a window of real text (the standard library's
textwrap.py, --tokens long, one thread, flash attention off, f32 KV cache for f32 and llama.cpp's default f16 cache
for the others) and the table gives the largest absolute difference from lmforge's own logits, their standard
deviation for scale, and how often the argmax agrees. Without a checkpoint the model is random-initialised with
the default recipe's options at --depth, with a tokenizer trained on 40 files of the standard library.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.export_gguf import GGUF_DTYPES, export_gguf
from lmforge.model.io import load_checkpoint_tokenizer, load_model, save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.recipe import load_recipe
from lmforge.tokenizer import train_tokenizer


def random_checkpoint(directory: Path, depth: int, vocab: int) -> Path:
    """The default recipe's model at `depth`, random-initialised (output layers too, so that logits vary), with a
    byte-level BPE tokenizer of `vocab`."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(textwrap.__file__).parent.glob("*.py"))]
    tok = train_tokenizer(iter(texts[: 40 if vocab > 1000 else 4]), vocab_size=vocab)
    tok.save(directory / "tokenizer.json")
    cfg = load_recipe(None, [f"model.depth={depth}", "model.zero_init_out=false"]).model  # logits that vary
    args = ModelArgs.from_config(cfg, tok.vocab_size)
    torch.manual_seed(0)
    return save_model(directory / "ckpt", Transformer(args), args, directory / "tokenizer.json")


def llama_cpp_logits(path: Path, ids: list[int], f32_cache: bool) -> np.ndarray | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}
    llm = llama_cpp.Llama(str(path), n_ctx=max(len(ids), 64), n_batch=len(ids), logits_all=True, n_threads=1,
                          flash_attn=False, verbose=False, **cache)  # fmt: skip
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="an lmforge checkpoint (default: a random-init model)")
    parser.add_argument("--depth", type=int, default=12, help="the random model's depth (width 64 * depth)")
    parser.add_argument("--tokens", type=int, default=128, help="length of the text window llama.cpp scores")
    parser.add_argument("--smoke", action="store_true", help="a depth-1 model, 32 tokens: checks the script runs")
    opts = parser.parse_args()
    depth, vocab, tokens = (1, 512, 32) if opts.smoke else (opts.depth, 8192, opts.tokens)
    torch.set_num_threads(1 if opts.smoke else torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = opts.checkpoint or random_checkpoint(Path(tmp), depth, vocab)
        model, args = load_model(ckpt)
        text = Path(textwrap.__file__).read_text(encoding="utf-8")
        ids = ([load_checkpoint_tokenizer(ckpt).doc_start_id] + load_checkpoint_tokenizer(ckpt).encode(text))[:tokens]
        with torch.no_grad():
            ours = model.eval()(torch.tensor([ids]))[0].float().numpy()
        params = sum(p.numel() for p in model.parameters())
        print(f"checkpoint: {ckpt} ({params / 1e6:.1f}M parameters, {args.n_layers} blocks, d_model {args.d_model})")
        print(f"{'dtype':6} {'MB':>9} {'bits/param':>10} {'export s':>9} {'max |dlogit|':>13} {'logit std':>9} "
              f"{'argmax agree':>12}")  # fmt: skip
        summary = {"params_m": f"{params / 1e6:.1f}"}
        for dtype in GGUF_DTYPES:
            start = time.perf_counter()
            path = export_gguf(ckpt, Path(tmp) / f"model-{dtype}.gguf", dtype)
            seconds = time.perf_counter() - start
            size = path.stat().st_size
            theirs = llama_cpp_logits(path, ids, f32_cache=dtype == "f32")
            diff = agree = "n/a"
            if theirs is not None:
                diff = f"{np.abs(theirs - ours).max():.2e}"
                agree = f"{(theirs.argmax(-1) == ours.argmax(-1)).mean():.3f}"
            print(f"{dtype:6} {size / 1e6:9.1f} {8 * size / params:10.2f} {seconds:9.2f} {diff:>13} "
                  f"{ours.std():9.3f} {agree:>12}")  # fmt: skip
            summary |= {f"{dtype}_mb": f"{size / 1e6:.1f}", f"{dtype}_export_s": f"{seconds:.2f}",
                        f"{dtype}_max_logit_diff": diff, f"{dtype}_argmax_agree": agree}  # fmt: skip
            path.unlink()
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
