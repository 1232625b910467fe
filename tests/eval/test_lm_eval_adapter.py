"""The lm-eval adapter: it scores as lmforge's scorer does, as lm-eval's own HF backend does on the export, and runs
a real lm-eval evaluation end to end through its command line, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("lm_eval", reason="the adapter is an lm-evaluation-harness backend")
from lm_eval.api.instance import Instance  # noqa: E402

from lmforge.eval import scorer  # noqa: E402
from lmforge.eval.lm_eval_adapter import LmforgeLM, main  # noqa: E402
from lmforge.hf import export_hf  # noqa: E402
from lmforge.model.io import save_model  # noqa: E402
from lmforge.model.transformer import ModelArgs, Transformer  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

ARC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval" / "mc" / "arc_easy.jsonl"
MAX_LEN = 64  # small, so that some ARC requests and texts overflow it and truncation / rolling windows are checked
SHORT_TEXTS = ["def add(a, b):\n    return a + b\n", "hello", "x = 12345 ** 2  # a comment"]


@pytest.fixture(scope="module")
def arc() -> list[dict]:
    if not ARC.is_file():
        pytest.skip(f"{ARC} (shared evaluation data) is not here")
    with ARC.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(40), f)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, arc) -> Path:
    """A tiny random model (GQA + QK-norm, so it exports as Qwen3) with a BPE tokenizer trained here."""
    tmp = tmp_path_factory.mktemp("lm")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:8]
    texts = [f.read_text(encoding="utf-8") for f in files] + [d["query"] + " " + " ".join(d["choices"]) for d in arc]
    train_tokenizer(texts, vocab_size=400).save(tmp / "tokenizer.json")
    args = ModelArgs(vocab_size=400, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=128,
                     max_seq_len=MAX_LEN, init_std=0.2, qk_norm=True)  # fmt: skip
    torch.manual_seed(0)
    return save_model(tmp / "ckpt", Transformer(args).eval(), args, tokenizer_path=tmp / "tokenizer.json")


@pytest.fixture(scope="module")
def adapter(ckpt) -> LmforgeLM:
    return LmforgeLM(checkpoint=str(ckpt), device="cpu", batch_size=8, max_gen_toks=16)


def mc_requests(docs: list[dict]) -> list[Instance]:
    return [Instance("loglikelihood", d, (d["query"] + "\nAnswer:", " " + c), i)
            for i, d in enumerate(docs) for c in d["choices"]]  # fmt: skip


def rolling(texts: list[str]) -> list[Instance]:
    return [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]


def long_texts() -> list[str]:
    source = Path(json.__file__).read_text(encoding="utf-8")
    return [source[:1500], source[2000:2600]]  # several windows each, the last one partial


def test_loglikelihood_and_rolling_equal_the_scorer(adapter, arc):
    reqs = mc_requests(arc[:20]) + [Instance("loglikelihood", {}, ("", "Sunlight"), 0),
                                    Instance("loglikelihood", {}, ("Answer: ", "yes"), 0)]  # fmt: skip
    ours = adapter.loglikelihood(reqs)
    theirs = scorer.loglikelihood(adapter.lm, [r.args for r in reqs], batch_size=8, progress=False)
    assert ours == theirs  # exactly: the same rows in the same batches
    assert all(type(lp) is float and type(greedy) is bool for lp, greedy in ours)
    assert all(lp < 0 for lp, _ in ours)
    # Texts that fit one window are cut identically by both; the adapter uses lm-eval's windows beyond that.
    assert adapter.loglikelihood_rolling(rolling(SHORT_TEXTS)) == pytest.approx(
        scorer.loglikelihood_rolling(adapter.lm, SHORT_TEXTS, batch_size=8, progress=False), abs=1e-5)
    assert adapter.loglikelihood_rolling(rolling(["", "hello", ""])) == [0.0, pytest.approx(
        scorer.loglikelihood_rolling(adapter.lm, ["hello"], progress=False)[0], abs=1e-5), 0.0]


def test_agrees_with_lm_eval_hf_backend_on_the_export(adapter, ckpt, arc, tmp_path):
    pytest.importorskip("accelerate", reason="lm-eval's HF backend imports accelerate (pip install 'lm-eval[hf]')")
    from lm_eval.models.huggingface import HFLM

    export = export_hf(ckpt, tmp_path / "hf")
    # The export's tokenizer prepends BOS, so HFLM's contexts start with BOS as the scorer's do.
    hf = HFLM(pretrained=str(export), device="cpu", batch_size=8)
    assert hf.max_length == MAX_LEN and hf.prefix_token_id == adapter.lm.prefix[0]
    # ARC as lm-eval builds it, and pairs that test the tokenization rules: trailing newlines and tabs of the
    # context move to the continuation, a token merging across the boundary, an empty context.
    edges = [("Question: why?\n", "Answer: yes"), ("Question: why?\n\n", "Because"), ("Answer:\t", "yes"),
             ("impo", "rt os"), ("hel", "lo world"), ("", "hello")]
    reqs = mc_requests(arc[:20]) + [Instance("loglikelihood", {}, pair, 0) for pair in edges]
    lengths = [len(adapter.lm.encode(c + x)) for c, x in (r.args for r in reqs)]
    assert max(lengths) > MAX_LEN  # left-truncation is part of what is compared
    ours, theirs = adapter.loglikelihood(reqs), hf.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs)) < 1e-4

    # For rolling windows HFLM prepends its prefix token itself; with the export's BOS-adding tokenizer it would
    # then score BOS after BOS, so its tokenizer's own BOS is switched off here (add_bos_token=False).
    hf_rolling = HFLM(pretrained=str(export), device="cpu", batch_size=8, add_bos_token=False)
    texts = SHORT_TEXTS + long_texts()
    assert max(len(adapter.lm.encode(t)) for t in texts) > 3 * MAX_LEN
    ours_r = adapter.loglikelihood_rolling(rolling(texts))
    theirs_r = hf_rolling.loglikelihood_rolling(rolling(texts), disable_tqdm=True)
    assert ours_r == pytest.approx(theirs_r, abs=1e-4)


def test_generate_until_is_the_scorers_greedy_text_and_honours_until(adapter):
    prompts = ["def add(a, b):\n", "import os\n", "class Foo"]
    free = adapter.generate_until([Instance("generate_until", {}, (p, {"until": []}), 0) for p in prompts])
    assert free == scorer.generate_until(adapter.lm, prompts, max_new_tokens=16, progress=False)
    text = max(free, key=len)
    assert len(text) >= 4, free
    stop = text[2:4]  # a stop string the greedy text is known to contain
    reqs = [Instance("generate_until", {}, (p, {"until": [stop], "do_sample": False, "max_gen_toks": 16}), 0)
            for p in prompts]  # fmt: skip
    assert adapter.generate_until(reqs) == [t[: t.find(stop)] if stop in t else t for t in free]
    # max_gen_toks is honoured per request; a single string for `until` is accepted as lm-eval's tasks give it.
    short = adapter.generate_until([Instance("generate_until", {}, (prompts[0], {"until": "\x00", "max_gen_toks": 3}),
                                             0)])  # fmt: skip
    assert short == scorer.generate_until(adapter.lm, prompts[:1], max_new_tokens=3, progress=False)


def test_sampling_is_seeded_and_bad_requests_are_refused(adapter):
    sample = {"until": [], "do_sample": True, "temperature": 1.0, "max_gen_toks": 12}
    reqs = [Instance("generate_until", {}, (p, sample), 0) for p in ["def ", "x = "]]
    first = adapter.generate_until(reqs)
    assert adapter.generate_until(reqs) == first
    greedy = adapter.generate_until([Instance("generate_until", {}, (p, {"until": []}), 0) for p in ["def ", "x = "]])
    assert first != greedy
    with pytest.raises(ValueError, match="empty continuation"):
        adapter.loglikelihood([Instance("loglikelihood", {}, ("hello", ""), 0)])
    with pytest.raises(ValueError, match="num_beams"):
        adapter.generate_until([Instance("generate_until", {}, ("def ", {"num_beams": 4}), 0)])


def test_model_args_win_over_harness_defaults(ckpt):
    # lm-eval's CLI always sends its own batch_size (1) and device (cuda:0) along with --model_args.
    lm = LmforgeLM.create_from_arg_string(f"checkpoint={ckpt},batch_size=4,max_gen_toks=7",
                                          {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})  # fmt: skip
    assert (lm.batch_size, lm.max_gen_toks) == (4, 7)
    assert lm.device == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert (lm.rank, lm.world_size) == (0, 1)
    assert LmforgeLM.create_from_arg_obj({"checkpoint": str(ckpt)}, {"batch_size": "auto"}).batch_size == 32
    with pytest.raises(ValueError, match="unknown lmforge model_args \\['pretrained'\\]"):
        LmforgeLM.create_from_arg_string(f"pretrained={ckpt}")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        LmforgeLM.create_from_arg_obj({"checkpoint": str(ckpt), "batch_size": 0})
    with pytest.raises(ValueError, match="needs a checkpoint"):
        LmforgeLM.create_from_arg_string("device=cpu")


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval...` now raises ImportError
    path = Path(sys.modules[LmforgeLM.__module__].__file__)
    spec = importlib.util.spec_from_file_location("lm_eval_adapter_without_lm_eval", path)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_cli_runs_a_local_multiple_choice_task_end_to_end(adapter, ckpt, arc, tmp_path, capsys):
    docs = arc[:12]
    data = tmp_path / "arc_tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arc_tiny.yaml").write_text(f"""\
task: lmforge_arc_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "datasets_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
""", encoding="utf-8")  # fmt: skip
    out = tmp_path / "out"
    main(["--model", "lmforge", "--model_args", f"checkpoint={ckpt},device=cpu,batch_size=16",
          "--tasks", "lmforge_arc_tiny", "--include_path", str(tasks), "--output_path", str(out)])  # fmt: skip
    assert "acc_norm" in capsys.readouterr().out  # lm-eval's results table
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text(encoding="utf-8"))["results"]["lmforge_arc_tiny"]

    # The same numbers, computed from the scorer directly: acc by log-likelihood, acc_norm per character.
    pairs = [r.args for r in mc_requests(docs)]
    lls = [lp for lp, _ in scorer.loglikelihood(adapter.lm, pairs, batch_size=16, progress=False)]
    acc = acc_norm = 0
    for d in docs:
        scores, lls = lls[: len(d["choices"])], lls[len(d["choices"]):]
        acc += max(range(len(scores)), key=lambda i: scores[i]) == d["gold"]
        acc_norm += max(range(len(scores)), key=lambda i: scores[i] / len(d["choices"][i])) == d["gold"]
    assert results["acc,none"] == pytest.approx(acc / len(docs))
    assert results["acc_norm,none"] == pytest.approx(acc_norm / len(docs))
    assert results["sample_len"] == len(docs)


# --- offline datasets and the command's help (issue 13) ---


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from lmforge.cli import app

    return CliRunner().invoke(app, ["lm-eval", *args])


@pytest.fixture
def empty_hf_caches(tmp_path, monkeypatch):
    """Hugging Face caches with nothing in them, whatever this machine has cached."""
    from datasets import config
    from huggingface_hub import constants

    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_offline_a_hub_dataset_fails_in_one_line_before_the_model_loads(empty_hf_caches, monkeypatch):
    loaded = []
    monkeypatch.setattr(scorer, "load_language_model", lambda *a, **kw: loaded.append(a))
    result = _invoke(["--model", "lmforge", "--model_args", "checkpoint=/nonexistent", "--tasks", "arc_easy"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: lm-eval cannot get dataset 'allenai/ai2_arc' for arc_easy: it is not in the local Hugging Face cache "
        "and there is no network (or HF_DATASETS_OFFLINE is set). Score local files instead: lmforge eval CHECKPOINT "
        "--tasks arc_easy --task-dir DIR (docs/evaluation.md lists the files), or run once with network to cache the "
        "dataset"]  # fmt: skip
    assert loaded == []


def test_groups_and_tags_expand_to_their_datasets_and_caches_count(empty_hf_caches):
    from lm_eval.tasks._index import Entry, Kind

    from lmforge.eval.lm_eval_adapter import missing_datasets

    def task(name, path, **kw):
        return Entry(name, Kind.TASK, None, {"task": name, "dataset_path": path, **kw})

    index = {"a": task("a", "org/a"), "b": task("b", "org/b"), "local": task("local", "json"),
             "tag": Entry("tag", Kind.TAG, None, None, {"a", "local"}),
             "grp": Entry("grp", Kind.GROUP, None, {"group": "grp", "task": ["tag", "b"]})}  # fmt: skip
    assert missing_datasets(["grp"], index) == {"a": "org/a", "b": "org/b"}
    assert missing_datasets(["local", "some/file.yaml"], index) == {}
    (empty_hf_caches / "hub" / "datasets--org--a").mkdir(parents=True)  # the Hub's cache has a copy
    (empty_hf_caches / "datasets" / "org___b").mkdir(parents=True)  # datasets' cache has a copy
    assert missing_datasets(["grp"], index) == {}


def test_a_connection_error_lm_eval_runs_into_is_one_line_too(monkeypatch):
    import lm_eval.__main__

    def unreachable():
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", unreachable)
    result = _invoke(["--model", "lmforge", "--tasks", "piqa,mmlu", "--limit", "5"])
    assert result.exit_code == 1
    assert result.output.startswith("error: lm-eval cannot get a dataset (Couldn't reach 'allenai/ai2_arc' on the "
                                    "Hub (LocalEntryNotFoundError)): ")  # fmt: skip
    assert "lmforge eval CHECKPOINT --tasks piqa --task-dir DIR" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_offline_means_no_network_or_the_offline_settings(monkeypatch):
    import socket

    from lmforge.eval.lm_eval_adapter import hub_unreachable

    calls = []

    def connect(address, timeout):
        calls.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub_unreachable() and calls == []  # HF_DATASETS_OFFLINE=1 (set above): no probe at all
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    assert hub_unreachable() and calls == [("hub.example", 8443)]
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: socket.socket())
    assert not hub_unreachable()


def test_help_shows_lmforge_usage_then_lm_evals_options():
    for flag in ("--help", "-h"):
        result = _invoke([flag])
        assert result.exit_code == 0
        assert result.output.startswith("usage: lmforge lm-eval --model lmforge --model_args checkpoint=DIR")
        example = "--model lmforge --model_args checkpoint=runs/stdlib-code/pretrain/final --tasks arc_easy"
        assert example in result.output
        assert "usage: lm-eval run" in result.output and "--model_args" in result.output.split("usage: lm-eval run")[1]
