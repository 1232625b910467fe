"""DPO on hh-rlhf helpful-base from a fine-tuned model: held-out reward margin and accuracy before and after, and,
given a reward model, the win rate of the tuned model's greedy replies against the starting model's on held-out
prompts, as that reward model judges them.

    python benchmarks/dpo_hh_rlhf.py --model runs/stdlib-code/sft/final --out runs/dpo-hh \
        [--reward-model runs/rm-hh/final] [--limit 800] [--steps 40] [--loss sigmoid] [--beta 0.1]
    python benchmarks/dpo_hh_rlhf.py --smoke     # seconds: a tiny random model and reward model, 2 steps

The pairs are `--limit` records of the file, of which a seeded 10% is held out (lmforge.align.dpo_stage, the same
split as `lmforge dpo` and `lmforge reward` with the same limit and train.seed): the win rate is measured on held-out
prompts only. Re-running into the same --out resumes (or reuses) the DPO run. The last line sums up as key=value.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmforge.align.dpo import HELDOUT
from lmforge.align.dpo_config import DPOConfig
from lmforge.align.dpo_stage import run_dpo, split_records
from lmforge.align.reward_model import load_reward_model, pairwise_accuracy, score_conversations
from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import generate
from lmforge.model.io import load_checkpoint_tokenizer, load_model
from lmforge.model.modes import evaluating

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh-rlhf_helpful-base_test.jsonl.gz"


def greedy(checkpoint: Path, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
    model, _ = load_model(checkpoint)
    with evaluating(model), torch.no_grad():
        return generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=stop_ids)


def win_rate(args: argparse.Namespace, cfg: DPOConfig, final: Path) -> dict[str, float]:
    """Greedy replies of the starting and the tuned model to held-out prompts, scored by the reward model."""
    tok = load_checkpoint_tokenizer(args.model)
    max_seq_len = load_model(args.model)[1].max_seq_len
    _, heldout, _ = split_records(cfg)
    fits = [p.prompt for p in heldout if len(prompt_ids(tok, p.prompt)) + args.gen_tokens <= max_seq_len]
    chosen = [fits[i] for i in np.linspace(0, len(fits) - 1, min(args.prompts, len(fits))).round().astype(int)]
    ids = [prompt_ids(tok, c) for c in chosen]
    rm = load_reward_model(args.reward_model)
    out: dict[str, float] = {"prompts": len(chosen)}
    scores = {}
    for name, checkpoint in (("start", args.model), ("dpo", final)):
        replies = greedy(checkpoint, ids, args.gen_tokens, tok.stop_ids)
        texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
        convs = [[*c, Message("assistant", t or " ")] for c, t in zip(chosen, texts)]
        scores[name], index, skipped = score_conversations(rm, tok, convs)
        assert len(index) == len(chosen), f"{skipped.count} replies could not be scored: {skipped.examples}"
        out[f"{name}_score"] = float(scores[name].mean())
        out[f"{name}_tokens"] = float(np.mean([len(r) for r in replies]))
        out[f"{name}_ended"] = float(np.mean([len(r) < args.gen_tokens for r in replies]))
    win = pairwise_accuracy(scores["dpo"], scores["start"])
    out.update(win_rate=win["value"], win_lo=win["ci95"][0], win_hi=win["ci95"][1])
    return out


def smoke_models(directory: Path, data: Path) -> tuple[Path, Path]:
    """--smoke: a tiny random model with a tokenizer trained on the file's first records, and a reward model (a
    random head) on it."""
    import gzip

    from lmforge.align.reward_model import RewardModel
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import train_tokenizer

    with gzip.open(data, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(200), f)]
    tok = train_tokenizer(iter(texts), vocab_size=512)
    tok.save(directory / "tokenizer.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16,
                     mlp_hidden=64, max_seq_len=128)  # fmt: skip
    torch.manual_seed(0)
    model = save_model(directory / "model", Transformer(args), args, directory / "tokenizer.json")
    RewardModel.from_checkpoint(model).save(directory / "rm", tokenizer_dir=model)
    return model, directory / "rm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the model to tune (normally sft/final)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--reward-model", type=Path, help="a reward model folder (lmforge reward's final/)")
    parser.add_argument("--limit", type=int, default=800)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--loss", default="sigmoid")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--max-prompt-len", type=int, default=160)
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts for the win rate")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="a few seconds on a tiny random model: does it run?")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.smoke else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.model, args.reward_model = smoke_models(Path(tmp), args.data)
            args.out = Path(tmp) / "out"
            vars(args).update(limit=40, steps=2, batch_size=4, max_len=128, max_prompt_len=64, prompts=4, gen_tokens=8)
            run(args)
        return
    if args.model is None or args.out is None:
        parser.error("--model and --out are required (or --smoke)")
    run(args)


def run(args: argparse.Namespace) -> None:
    """DPO, the held-out table, the win rate with a reward model, and the summary line."""
    cfg = DPOConfig(data=str(args.data), limit=args.limit, loss=args.loss, beta=args.beta, max_len=args.max_len,
                    max_prompt_len=args.max_prompt_len,
                    train={"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                           "eval_every": max(1, args.steps // 4), "ckpt_every": max(1, args.steps // 4),
                           "warmup_steps": min(10, args.steps // 4), "compile": False})  # fmt: skip
    m = run_dpo(args.model, cfg, args.out)
    before, after = m["heldout_before"], m["heldout_after"]
    print(f"\nDPO ({args.loss}, beta {args.beta}) on {m['train_pairs']} pairs, {m['steps']} steps of "
          f"{args.batch_size}, {m['train_seconds']:.0f} s; {m['heldout_pairs']} held-out pairs\n")
    print("| held-out | before | after |\n|---|---:|---:|")
    for key in ("rewards/margin", "rewards/accuracy", "rewards/chosen", "rewards/rejected", "kl", "loss"):
        print(f"| {key} | {before[HELDOUT + key]:.4f} | {after[HELDOUT + key]:.4f} |")
    summary = {"train_pairs": m["train_pairs"], "heldout_pairs": m["heldout_pairs"], "steps": m["steps"],
               "heldout_margin": f"{after[HELDOUT + 'rewards/margin']:.4f}",
               "heldout_accuracy": f"{after[HELDOUT + 'rewards/accuracy']:.4f}",
               "chosen_reward_falling": m["chosen_reward_falling"]}  # fmt: skip
    if args.reward_model:
        w = win_rate(args, cfg, args.out / "final")
        print(f"\n| greedy replies to {w['prompts']:.0f} held-out prompts | start | dpo |\n|---|---:|---:|")
        for key in ("score", "tokens", "ended"):
            print(f"| {key} | {w['start_' + key]:.3f} | {w['dpo_' + key]:.3f} |")
        print(f"\nwin rate of the DPO replies (ties half): {w['win_rate']:.3f} [{w['win_lo']:.3f}, {w['win_hi']:.3f}]")
        summary |= {"win_rate": f"{w['win_rate']:.3f}", "win_ci95": f"{w['win_lo']:.3f}-{w['win_hi']:.3f}"}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
