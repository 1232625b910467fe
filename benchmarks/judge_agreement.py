"""How well AI judges agree with people: accuracy and Cohen's kappa of each judge against the 3-annotator majority
of PandaLM's 999 test pairs (ties a class of their own; pairs without a majority counted and left out), accuracy on
a seeded sample of hh-rlhf helpful-base pairs (chosen vs rejected; a tie counts half), and the position-bias rate
of the LLM judges (the share of pairs where the same position won in both orders).

    python benchmarks/judge_agreement.py --llm runs/stdlib-code/sft/final --llm runs/stdlib-code/grpo/final \
        --reward runs/rm-judge/final [--hh-skip 1500] [--hh-sample 500] [--batch-size 16]
    python benchmarks/judge_agreement.py --smoke     # seconds: a tiny random model and reward model, 30 pairs each

The hh-rlhf sample is drawn from the records after the first --hh-skip (those a reward model trained with
`lmforge reward ... --limit 1500` may have seen), so the reward judge is measured on pairs it never trained on.
The last line sums up the best judge by PandaLM kappa as key=value.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from lmforge.judge.base import Judge, LengthJudge, Verdict, position_bias_rate
from lmforge.judge.llm import LLMJudge
from lmforge.judge.reward import RewardJudge
from lmforge.judge.stage import agreement, pair_items
from lmforge.label.candidates import Candidate, read_candidates
from lmforge.stats import proportion

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference"
PANDALM = DATA / "pandalm_testset-v1.json"
HH = DATA / "hh-rlhf_helpful-base_test.jsonl.gz"


def hh_sample(path: Path, skip: int, n: int, limit: int | None) -> list[Candidate]:
    items, _ = read_candidates(path, limit)
    rest = items[skip:] if len(items) > skip else items
    return random.Random(0).sample(rest, min(n, len(rest)))


def score(verdicts: list[Verdict], labels: list[str], ties_half: bool) -> dict:
    """Agreement of the judged verdicts with the labels: exact accuracy and Cohen's kappa (PandaLM, where ties are
    a class), or accuracy with a tie counting half and its Wilson interval (hh-rlhf, where none is a tie)."""
    judged = [(v, label) for v, label in zip(verdicts, labels) if not v.skipped]
    out = {"n": len(judged), "ties": sum(v.choice == "tie" for v, _ in judged) / max(len(judged), 1),
           "bias": position_bias_rate([v for v, _ in judged]),
           "first": sum(v.p_a_first > 0.5 > v.p_a_second for v, _ in judged if v.p_a_first is not None)}
    if ties_half:
        out["accuracy"] = proportion(sum((v.choice == lab) + 0.5 * (v.choice == "tie") for v, lab in judged), out["n"])
    else:
        out.update(agreement([v for v, _ in judged], [lab for _, lab in judged]) or {})
    return out


def measure(judge: Judge, pandalm: list[Candidate], hh: list[Candidate], batch_size: int) -> dict:
    """One judge on both sets, and the length baseline on the very pairs it judged (a judge may skip some)."""
    start = time.perf_counter()
    row: dict = {"judge": judge.name}
    for name, items in (("pandalm", pandalm), ("hh", hh)):
        pairs = pair_items(items)
        verdicts: list[Verdict] = []
        for i in range(0, len(pairs), batch_size * 8):
            verdicts += judge.compare_many([item for *_, item in pairs[i : i + batch_size * 8]])
        labels = [c.label for c, *_ in pairs]
        kept = [k for k, v in enumerate(verdicts) if not v.skipped]
        row[name] = score(verdicts, labels, name == "hh")
        row[f"{name}_skipped"] = len(pairs) - len(kept)
        baseline = LengthJudge().compare_many([pairs[k][3] for k in kept])
        row[f"{name}_length"] = score(baseline, [labels[k] for k in kept], name == "hh")
    row["seconds"] = time.perf_counter() - start
    row["truncated"] = getattr(judge, "truncated", 0)
    return row


def tiny_models(root: Path) -> tuple[Path, Path]:
    """A tiny random checkpoint (its tokenizer trained on PandaLM's instructions) and a reward model on it."""
    from lmforge.align.reward_model import RewardModel
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import train_tokenizer

    items, _ = read_candidates(PANDALM, limit=200)
    tok = train_tokenizer(iter([c.prompt[-1].content for c in items] * 3), vocab_size=600)
    tok.save(root / "tok.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16,
                     mlp_hidden=128, max_seq_len=256)  # fmt: skip
    torch.manual_seed(0)
    ckpt = save_model(root / "ckpt", Transformer(args), args, root / "tok.json")
    return ckpt, RewardModel.from_checkpoint(ckpt).save(root / "rm", tokenizer_dir=ckpt)


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _bias(m: dict) -> str:
    return "-" if m["bias"] is None else f"{m['bias']:.3f} ({m['first']} A)"


def report(rows: list[dict], pandalm_n: int, pandalm_skipped: int, hh_n: int) -> None:
    print(f"PandaLM: {pandalm_n} pairs with a majority ({pandalm_skipped} records without one or unreadable, left "
          f"out); hh-rlhf helpful-base: {hh_n} pairs. 'length' columns: the length baseline on the same pairs.\n")
    print("| judge | PandaLM pairs | acc | kappa | length kappa | ties | position bias (A) | hh pairs | acc [95% CI] | "
          "length acc | ties | position bias (A) | replies cut | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, h, hl = r["pandalm"], r["hh"], r["hh_length"]["accuracy"]
        acc = h["accuracy"]
        print(f"| {r['judge']} | {p['n']} | {fmt(p.get('accuracy'))} | {fmt(p.get('kappa'))} | "
              f"{fmt(r['pandalm_length'].get('kappa'))} | {fmt(p['ties'])} | {_bias(p)} | {h['n']} | "
              f"{fmt(acc['value'])} [{fmt(acc['ci95'][0])}, {fmt(acc['ci95'][1])}] | {fmt(hl['value'])} | "
              f"{fmt(h['ties'])} | {_bias(h)} | {r['truncated']} | {r['seconds']:.0f} |")
    best = max(rows, key=lambda r: r["pandalm"].get("kappa", float("-inf")))
    bias = best["pandalm"]["bias"] or 0.0  # length, reward: 0 by construction
    print(f"\nbest={best['judge'].replace(' ', '_')} kappa_pandalm={best['pandalm']['kappa']:.4f} "
          f"acc_hh={best['hh']['accuracy']['value']:.4f} position_bias={bias:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", action="append", default=[], help="An LLM judge's checkpoint (repeatable).")
    parser.add_argument("--reward", action="append", default=[], help="A reward model folder (repeatable).")
    parser.add_argument("--hh-skip", type=int, default=1500, help="hh-rlhf records left out of the sample.")
    parser.add_argument("--hh-sample", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="Seconds: tiny random models, 30 pairs per set.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    limit = 30 if args.smoke else None
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            ckpt, rm = tiny_models(Path(tmp))
            args.llm, args.reward, args.hh_skip, args.hh_sample = [str(ckpt)], [str(rm)], 0, 30
        pandalm, skipped = read_candidates(PANDALM, limit)
        hh = hh_sample(HH, args.hh_skip, args.hh_sample, None if limit is None else args.hh_skip + limit)
        judges: list[Judge] = [LengthJudge()]
        judges += [LLMJudge.from_checkpoint(c, name=f"llm:{c}", device="cpu", batch_size=args.batch_size)
                   for c in args.llm]  # fmt: skip
        judges += [RewardJudge.from_dir(r, name=f"reward:{r}", batch_size=args.batch_size, device="cpu")
                   for r in args.reward]  # fmt: skip
        rows = [measure(judge, pandalm, hh, args.batch_size) for judge in judges]
    report(rows, len(pandalm), skipped.count, len(hh))


if __name__ == "__main__":
    main()
