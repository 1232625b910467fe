"""generate and chat on the first hour's paths (issue 13): lengths capped to the context with a notice, one error
for a prompt that fills the context, checkpoint paths that do not exist or name a run folder, --device, and
lmforge's own Hugging Face export; generation inside the eval and sft stages fits a small context."""

from __future__ import annotations

import json
import logging
import sysconfig
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_chain
from lmforge.cli import app
from lmforge.eval.run import evaluate_checkpoint, sample_generations
from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.chat import load_chat
from lmforge.infer.engine import cap_new_tokens
from lmforge.infer.loading import load_for_generation
from lmforge.model.io import load_model, save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.eval.config import EvalConfig
from lmforge.finetune.config import SFTConfig
from lmforge.tokenizer import Tokenizer, train_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:3]
    return train_tokenizer([f.read_text(encoding="utf-8") for f in files], vocab_size=300)


def make_model(tok: Tokenizer, max_seq_len: int, init_std: float = 1.0) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                 head_dim=16, mlp_hidden=64, max_seq_len=max_seq_len, init_std=init_std)).eval()


def replier(tok: Tokenizer, max_seq_len: int) -> Transformer:
    """Greedy text "xyxy..." after BOS or a chat prompt (which ends in <|assistant|>), never ending its turn: every
    generation runs to its length limit, which is what the caps set."""
    x, y = tok.encode("x")[0], tok.encode("y")[0]
    chain = {tok.token_to_id("<|assistant|>"): x, x: y, y: x, tok.bos_id: x}
    return make_chain(make_model(tok, max_seq_len), chain)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok) -> Path:
    """runs/r with pretrain/final and sft/final (the newer), both 48-token models, like a finished run."""
    root = tmp_path_factory.mktemp("runs") / "r"
    tok.save(root.parent / "tokenizer.json")
    model = replier(tok, 48)
    for stage in ("pretrain", "sft"):
        save_model(root / stage / "final", model, model.args, tokenizer_path=root.parent / "tokenizer.json")
    return root


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def last_line(result) -> str:  # noqa: ANN001
    """The generated text: log lines (the notices) come before it, transformers' progress bars go to stderr."""
    return result.stdout.splitlines()[-1]


def words(result) -> str:  # noqa: ANN001
    """The output with the log's line wrapping undone."""
    return " ".join(result.output.split())


# --- lengths that do not fit are capped, with a notice ---


def test_cap_new_tokens_keeps_what_fits_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="lmforge.infer.engine"):
        assert cap_new_tokens(40, 48, 8) == 40 and not caplog.text
        assert cap_new_tokens(256, 48, 5) == 43
        assert cap_new_tokens(256, 48) == 24  # prompt not known yet: half the context stays the prompt's
    assert caplog.messages == [
        "max_new_tokens=256 does not fit the model's 48-token context after the 5-token prompt: generating at "
        "most 43 new tokens",
        "max_new_tokens=256 does not fit the model's 48-token context keeping half of it for the prompt: "
        "generating at most 24 new tokens",
    ]
    with pytest.raises(ValueError) as e:
        cap_new_tokens(10, 48, 48)
    assert str(e.value) == "the prompt alone has 48 tokens and the model's context is 48 tokens: shorten the prompt"


def test_generate_asking_for_more_than_the_context_holds_generates_what_fits(run_dir, tok):
    # Before: "max_new_tokens must be in [1, 48)" / "prompt 0 has 1 tokens; with max_new_tokens=256 ...".
    result = invoke("generate", str(run_dir / "pretrain" / "final"), "-n", "256", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert last_line(result) == "xy" * 23 + "x"  # BOS + 47 new tokens fill the 48-token context
    assert result.stdout == "xy" * 23 + "x\n"  # the notice is a log line on stderr: `generate > out.txt` holds the text
    assert "max_new_tokens=256 does not fit the model's 48-token context after the 1-token prompt: generating at " \
           "most 47 new tokens" in words(result)  # fmt: skip
    result = invoke("generate", str(run_dir / "sft" / "final"), "--chat", "-p", "hi", "-n", "256", "--temperature", "0")
    assert result.exit_code == 0, result.output
    room = 48 - len(prompt_ids(tok, [Message("user", "hi")]))
    assert last_line(result) == ("xy" * 24)[:room]


def test_readme_chat_command_runs_with_its_default_length(run_dir, caplog):
    # The README's `lmforge chat runs/NAME/sft/final`: the default 256 tokens per reply on a 48-token model.
    session = load_chat(run_dir / "sft" / "final", device="cpu")
    assert session.max_new_tokens == 24
    assert caplog.messages == ["max_new_tokens=256 does not fit the model's 48-token context keeping half of it for "
                               "the prompt: generating at most 24 new tokens"]  # fmt: skip
    result = invoke("chat", str(run_dir / "sft" / "final"), "--temperature", "0", "--device", "cpu",
                    input="hello\n/exit\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "xy" * 12 + "\n" in result.output and "xy" * 13 not in result.output  # 24-token replies


def test_a_chat_message_too_long_for_the_reply_gets_a_shorter_reply(run_dir, tok):
    session = load_chat(run_dir / "sft" / "final", device="cpu", temperature=0, max_new_tokens=20)
    text = next(t for t in (f"w{'o' * n}" for n in range(60)) if len(prompt_ids(tok, [Message("user", t)])) > 28)
    reply = session.send(text)
    assert reply.max_new_tokens == 48 - len(reply.prompt_ids) < 20
    assert len("".join(reply)) == reply.max_new_tokens and reply.finish_reason == "length"


# --- a prompt that fills the context: one error, plain and --chat ---


def test_a_prompt_that_fills_the_context_is_one_error_for_plain_and_chat(run_dir, tok):
    ckpt = str(run_dir / "sft" / "final")
    prompt = "word " * 60
    plain = invoke("generate", ckpt, "-p", prompt)
    chat = invoke("generate", ckpt, "--chat", "-p", prompt)
    n_plain = 1 + len(tok.encode(prompt))
    n_chat = len(prompt_ids(tok, [Message("user", prompt)]))
    assert plain.exit_code == chat.exit_code == 2
    assert plain.output == (f"error: the prompt alone has {n_plain} tokens and the model's context is 48 tokens: "
                            "shorten the prompt\n")  # fmt: skip
    assert chat.output == (f"error: the prompt alone has {n_chat} tokens and the model's context is 48 tokens: "
                           "shorten the prompt\n")  # fmt: skip
    assert "word word" not in plain.output  # the prompt is not echoed


# --- checkpoint paths ---


def test_a_missing_checkpoint_says_it_does_not_exist(tmp_path):
    for verb in (["generate"], ["chat"]):
        result = invoke(*verb, str(tmp_path / "nowhere"))
        assert result.exit_code == 2
        assert result.output == f"error: checkpoint {tmp_path / 'nowhere'} does not exist\n"
    with pytest.raises(FileNotFoundError, match=r"^checkpoint .*nowhere does not exist$"):
        load_model(tmp_path / "nowhere")


def test_a_run_or_stage_folder_names_the_checkpoint_inside(run_dir):
    stage = invoke("generate", str(run_dir / "pretrain"))
    assert stage.exit_code == 2
    assert stage.output == (f"error: {run_dir / 'pretrain'} is not a model checkpoint but holds one: give "
                            f"{run_dir / 'pretrain' / 'final'}\n")  # fmt: skip
    run = invoke("chat", str(run_dir))
    assert run.exit_code == 2
    assert run.output == (f"error: {run_dir} is not a model checkpoint but holds one: give {run_dir / 'sft' / 'final'} "
                          f"(the newest; also {run_dir / 'pretrain' / 'final'})\n")  # fmt: skip
    # Every verb loads through lmforge.model.io, so export (and eval, embed, sft) say the same.
    from lmforge.hf import export_hf

    with pytest.raises(FileNotFoundError, match=r"holds one: give .*pretrain/final$"):
        export_hf(run_dir / "pretrain", run_dir.parent / "hf")


# --- --device ---


def test_generate_takes_a_device(run_dir):
    ckpt = str(run_dir / "pretrain" / "final")
    ok = invoke("generate", ckpt, "-n", "3", "--temperature", "0", "--device", "cpu")
    assert ok.exit_code == 0 and ok.output == "xyx\n"
    bad = invoke("generate", ckpt, "--device", "tpu")
    assert bad.exit_code == 2 and bad.output == "error: device='tpu' is not a device; use auto, cpu, cuda or cuda:N\n"


# --- lmforge's own Hugging Face export ---


def test_the_export_loads_back_into_the_backbone(tmp_path, tok):
    from lmforge.hf import export_hf
    from lmforge.model.transformer import Transformer

    model = make_model(tok, 48, init_std=0.3)
    tok.save(tmp_path / "tokenizer.json")
    save_model(tmp_path / "ckpt", model, model.args, tokenizer_path=tmp_path / "tokenizer.json")
    back, back_tok = load_for_generation(export_hf(tmp_path / "ckpt", tmp_path / "hf"), "cpu")
    assert isinstance(back, Transformer) and back.args.max_seq_len == 48 and back_tok.vocab_size == tok.vocab_size
    assert back_tok.stop_ids == tok.stop_ids and back_tok.bos_id == tok.bos_id
    ids = torch.randint(8, tok.vocab_size, (1, 20))
    with torch.inference_mode():
        assert torch.equal(back(ids), model(ids))


def test_generate_and_chat_read_the_export(run_dir, tmp_path):
    pytest.importorskip("transformers")
    from lmforge.hf import export_hf

    out = str(export_hf(run_dir / "sft" / "final", tmp_path / "hf"))
    ckpt = str(run_dir / "sft" / "final")
    for args in (["-n", "9"], ["--chat", "-p", "hi", "-n", "7"]):
        ours = invoke("generate", ckpt, "--temperature", "0", *args)
        theirs = invoke("generate", out, "--temperature", "0", "--device", "cpu", *args)
        assert theirs.exit_code == 0, theirs.output
        assert last_line(theirs) == last_line(ours) and last_line(ours).startswith("xyx")
    chat = invoke("chat", out, "-n", "4", "--temperature", "0", input="hello\nagain\n/history\n/exit\n")
    assert chat.exit_code == 0, chat.output
    assert chat.output.count("xyxy\n") == 4  # two replies, and both in the history


# --- generation inside the stages fits a small context ---


def test_eval_samples_fit_a_64_token_model(tmp_path, tok, caplog, monkeypatch):
    from lmforge.eval import run

    # Before: "prompt 0 has 5 tokens; with max_new_tokens=160 that exceeds the model's max_seq_len=64".
    lengths = []
    real = run.generate
    monkeypatch.setattr(run, "generate", lambda m, p, n, **kw: lengths.append(n) or real(m, p, n, **kw))
    model = make_model(tok, 64, init_std=0.3)
    cfg = EvalConfig(samples=3)  # sample_tokens=160, prompts "def ", "class ", "import "
    assert len(sample_generations(model, tok, cfg, torch.device("cpu"))) == 3
    longest = max(1 + len(tok.encode(p)) for p in cfg.prompts)
    assert lengths == [64 - longest] * 3
    assert caplog.messages.count(f"eval.sample_tokens=160 does not fit the model's 64-token context after the "
                                 f"{longest}-token prompt: generating at most {64 - longest} new tokens") == 1
    tok.save(tmp_path / "tokenizer.json")
    save_model(tmp_path / "ckpt", model, model.args, tokenizer_path=tmp_path / "tokenizer.json")
    (tmp_path / "val.py").write_text("def f(x):\n    return x + 1\n" * 20, encoding="utf-8")
    evaluate_checkpoint(tmp_path / "ckpt", tmp_path / "val.py", EvalConfig(samples=1), tmp_path / "eval", device="cpu")
    assert len(json.loads((tmp_path / "eval" / "results.json").read_text())["samples"]) == 1


def test_sft_stage_replies_fit_a_64_token_model(tmp_path, tok, caplog):
    from lmforge.finetune.stage import run_sft

    # Before: sft.gen_tokens=96 left no held-out prompt room in 64 tokens, so no replies were checked at all.
    tok.save(tmp_path / "tokenizer.json")
    model = replier(tok, 64)
    save_model(tmp_path / "pretrain" / "final", model, model.args, tokenizer_path=tmp_path / "tokenizer.json")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "response": "xy"}) + "\n" for i in range(20)))
    cfg = SFTConfig(data=str(data), val_fraction=0.2, gen_prompts=2, samples=1,
                    train={"max_steps": 1, "batch_size": 2, "compile": False, "device": "cpu"})  # fmt: skip
    metrics = run_sft(tmp_path / "pretrain" / "final", None, cfg, tmp_path / "sft")
    assert "sft.gen_tokens=96 does not fit the model's 64-token context keeping half of it for the prompt: " \
           "generating at most 32 new tokens" in caplog.messages  # fmt: skip
    assert metrics["generation_before"]["mean_new_tokens"] == 32  # the chain never ends its turn
    assert len(metrics["samples"]) == 1
