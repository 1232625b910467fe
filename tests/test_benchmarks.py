"""Every script in benchmarks/ runs in its --smoke mode and ends with its one key=value summary line.

Benchmarks run rarely and by hand, so a library change that breaks one would otherwise go unnoticed until someone
needs its numbers. Each smoke run takes seconds: tiny models and a few documents, built inside the script.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SHARED = ROOT.parent / "shared" / "data"
PAIR = re.compile(r"[A-Za-z_]\w*=\S+")


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


_FINETUNE_KEYS = {f"{method}_{measure}" for method in ("full", "full_frozen", "lora_qv", "lora_all", "prefix",
                                                       "prefix_mlp")
                  for measure in ("trainable", "state_mb", "peak_mb", "step_ms")}  # fmt: skip
# What a benchmark reports of its peer, when the peer is installed.
_HFLM_KEYS = {f"{key}{suffix}" for key in ("adapter_examples_per_s", "hflm_examples_per_s", "speedup")
              for suffix in ("", "_tuned")} if _have("lm_eval") else set()  # fmt: skip
_DATATROVE_KEYS = {"datatrove_spacy_docs_per_s", "agreement_whitespace"} if _have("datatrove") else set()
_TRAFILATURA_KEYS = {"trafilatura_f1", "trafilatura_pages_s"} if _have("trafilatura") else set()
_TRL_KEYS = {"dpo_speed_ratio", "dpo_mem_ratio"} | {f"{side}_{m}" for side in ("trl", "trl_precomputed")
                                                   for m in ("step_ms", "peak_mb")} if _have("trl") else set()

# script: (the shared data it reads, relative to ../shared/data, or None; the keys its summary line must hold)
CASES: dict[str, tuple[str | None, set[str]]] = {
    "align_vs_trl.py": ("preference/hh-rlhf_helpful-base_test.jsonl.gz", {"lmforge_step_ms", "lmforge_peak_mb"}
                        | _TRL_KEYS),  # fmt: skip
    "compile_speed.py": (None, {f"{mode}_{key}" for mode in ("eager", "compiled")
                                for key in ("step_ms", "tokens_per_s", "wall_s")}),  # fmt: skip
    "curate_throughput.py": ("web/cc_text", {"docs", "lmforge_docs_per_s"} | _DATATROVE_KEYS),
    "dedup_accuracy.py": (None, {"precision", "recall", "f1", "pairs", "docs_per_s", "mb_per_s", "bytes_per_doc"}),
    "distributed_throughput.py": (None, {"steps", "single_tokens_per_s", "single_mfu", "ddp_tokens_per_s", "ddp_mfu",
                                         "ddp_vs_single", "ddp_max_loss_diff"}),  # fmt: skip
    "dpo_hh_rlhf.py": ("preference/hh-rlhf_helpful-base_test.jsonl.gz", {"train_pairs", "heldout_pairs", "steps",
                       "heldout_margin", "heldout_accuracy", "chosen_reward_falling", "win_rate", "win_ci95"}),
    "engine_decode.py": (None, {"decode_ratio_c1", "generate_ratio_c1", "throughput_ratio_c8", "engine_c1_tok_s",
                                "engine_c8_tok_s"}),  # fmt: skip
    "eval_throughput.py": ("eval/mc/arc_easy.jsonl", {"examples", "requests", "lmforge_examples_per_s",
                                                      "lmforge_examples_per_s_tuned", "max_logprob_diff"}
                           | _HFLM_KEYS),  # fmt: skip
    "finetune_memory.py": ("instruct/alpaca_data_sample2000.json", {"params"} | _FINETUNE_KEYS),
    "gguf_export.py": (None, {"params_m"} | {f"{dtype}_{m}" for dtype in ("f32", "f16", "q8_0")
                                             for m in ("mb", "export_s", "max_logit_diff", "argmax_agree")}),  # fmt: skip
    "hf_import.py": (None, {"max_logit_diff", "load_time_ratio", "peak_rss_ratio", "worst_load_time_ratio",
                            "worst_peak_rss_ratio"}),  # fmt: skip
    "html_extraction.py": ("web/html/article-extraction-benchmark",
                           {"resiliparse_f1", "resiliparse_pages_s", "resiliparse_whole_page_f1",
                            "resiliparse_whole_page_pages_s"} | _TRAFILATURA_KEYS),
    "judge_agreement.py": ("preference/pandalm_testset-v1.json", {"best", "kappa_pandalm", "acc_hh", "position_bias"}),
    "label_store.py": (None, {"votes_per_s_1", "votes_per_s_32", "p95_ms_32", "exact_k", "duplicates"}),
    "pii_accuracy.py": ("pii", {f"{kind}_{m}" for kind in ("email", "phone", "credit_card", "ip_address", "us_ssn",
                                                           "iban", "dolma_email") for m in ("p", "r")}
                        | {"mb_per_s"}),  # fmt: skip
    "rag_index.py": (None, {"files", "chunks", "bm25_files_per_s", "bm25_chunks_per_s", "unchanged_s", "edit_s",
                            "edit_rechunked", "dense_chunks_per_s", "bm25_search_ms", "hybrid_search_ms"}),
    "recipe_efficiency.py": (None, {"gpt2_final", "modern_final", "modern_time_ratio", "default_final",
                                    "default_time_ratio", "budget_s", "depth"}),  # fmt: skip
    "serve_load.py": ("instruct/alpaca_data_sample2000.json", {"decode_ratio_c1", "throughput_ratio_c32", "tok_s_c1",
                      "tok_s_c32", "transformers_tok_s", "ttft_p99_ms_c32", "lost", "healthy_after_disconnect",
                      "rss_mb_max"}),  # fmt: skip
    "reward_sandbox.py": ("code/mbpp.jsonl", {"samples"} | {f"{r}_{m}" for r in ("mbpp_tests", "doctests")
                                                            for m in ("batched_per_s", "unbatched_per_s", "speedup")}),
    "train_throughput.py": (None, {"tokens_per_s", "mfu", "peak_gflops", "params"}),
}


def _is_summary(line: str) -> bool:
    words = line.split()
    return bool(words) and all(PAIR.fullmatch(w) for w in words)


def summary(stdout: str) -> dict[str, str]:
    """The last non-empty line as a dict, after checking that it is the only line of key=value pairs."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "the benchmark printed nothing"
    assert _is_summary(lines[-1]), f"the last line is not key=value pairs: {lines[-1]!r}"
    others = [line for line in lines[:-1] if _is_summary(line)]
    assert not others, f"more than one summary line: {others}"
    return dict(word.split("=", 1) for word in lines[-1].split())


def test_every_benchmark_has_a_smoke_case() -> None:
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(CASES)


def test_summary_takes_only_the_last_line() -> None:
    assert summary("| table | 1 |\n\nrate=1.5 n=3\n\n") == {"rate": "1.5", "n": "3"}
    with pytest.raises(AssertionError, match="not key=value"):
        summary("rate=1.5\ndone")
    with pytest.raises(AssertionError, match="more than one"):
        summary("a=1\nb=2")


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_smoke(script: str, tmp_path: Path) -> None:
    data, keys = CASES[script]
    if data is not None and not (SHARED / data).exists():
        pytest.skip(f"{script} reads {SHARED / data}, which is not here")
    # From an empty folder, so a smoke run that relied on the working directory or wrote into it would show.
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{script} --smoke exited {done.returncode}:\n{done.stderr[-4000:]}"
    got = summary(done.stdout)
    assert keys <= got.keys(), f"{script}: summary lacks {sorted(keys - got.keys())}: {got}"
    assert not list(tmp_path.iterdir()), f"{script} --smoke left files in the working directory"
