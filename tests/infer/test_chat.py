"""Chat: the session's prompts are the template's ids, replies stream and stop at <|end|>, history grows and is
truncated from the oldest turn, the cache gives the same tokens as recomputing, the terminal loop's commands, and
evaluation through the chat template."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from helpers import make_chain
from lmforge.eval import code as code_eval
from lmforge.eval.scorer import from_lmforge, generate_until
from lmforge.eval.suite import run_task
from lmforge.finetune.data import Message
from lmforge.finetune.template import END, prompt_ids
from lmforge.infer import engine
from lmforge.infer.chat import ChatSession, chat_once, load_chat, run_chat, user_prompt_ids
from lmforge.model.io import save_model
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.eval.config import EvalConfig
from lmforge.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:3]
    return train_tokenizer([f.read_text(encoding="utf-8") for f in files], vocab_size=300)


def make_model(tok: Tokenizer, max_seq_len: int = 48, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = dict(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=64,
                max_seq_len=max_seq_len, init_std=1.0)  # fmt: skip
    return Transformer(ModelArgs(**(args | kw))).eval()


def chain_model(tok: Tokenizer, chain: dict[int, int], max_seq_len: int = 48) -> Transformer:
    """Greedy choice after token t is chain[t] (see helpers.make_chain)."""
    return make_chain(make_model(tok, max_seq_len), chain)


def ids(tok: Tokenizer, token: str) -> int:
    return tok.token_to_id(token)


def make_replier(tok: Tokenizer, max_seq_len: int) -> Transformer:
    """Answers every prompt (which ends in <|assistant|>) with "日x" (日 is three byte tokens), then <|end|>."""
    ri, x = tok.encode("日"), tok.encode("x")[0]
    assert len(ri) == 3
    return chain_model(tok, {ids(tok, "<|assistant|>"): ri[0], ri[0]: ri[1], ri[1]: ri[2], ri[2]: x,
                             x: ids(tok, END)}, max_seq_len)  # fmt: skip


@pytest.fixture(scope="module")
def replier(tok: Tokenizer) -> Transformer:
    return make_replier(tok, 48)


@pytest.fixture(scope="module")
def long_replier(tok: Tokenizer) -> Transformer:
    return make_replier(tok, 160)


def test_replies_stream_stop_at_end_and_history_grows(tok, replier):
    s = ChatSession(replier, tok, system="Be brief.", max_new_tokens=8, temperature=0)
    first = s.send("hello")
    pieces = list(first)
    assert pieces == ["日", "x"]  # the three byte tokens of 日 arrive as one piece; <|end|> is never emitted
    assert first.text == "".join(pieces) == "日x" and first.finish_reason == "stop"
    assert first.tokens == tok.encode("日x")  # stopped before <|end|>, which is not part of the reply
    assert first.prompt_ids == prompt_ids(tok, [Message("system", "Be brief."), Message("user", "hello")])
    assert s.history == [Message("system", "Be brief."), Message("user", "hello"), Message("assistant", "日x")]

    second = s.send("and again?")
    assert second.prompt_ids == prompt_ids(tok, s.history + [Message("user", "and again?")])
    # The cache held the first prompt and the reply: only <|end|> <|user|> message <|end|> <|assistant|> are run.
    assert second.reused == len(second.prompt_ids) - len(tok.encode("and again?")) - 4
    assert "".join(second) == "日x"
    assert [m.role for m in s.history] == ["system", "user", "assistant", "user", "assistant"]
    s.reset()
    assert s.history == [Message("system", "Be brief.")]


def test_eos_and_max_new_tokens_end_a_reply(tok):
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    to_eos = chain_model(tok, {ids(tok, "<|assistant|>"): a, a: b, b: tok.eos_id})
    reply = chat_once(to_eos, tok, "hi", temperature=0, max_new_tokens=8)
    assert "".join(reply) == "ab" and reply.finish_reason == "stop"
    looping = chain_model(tok, {ids(tok, "<|assistant|>"): a, a: b, b: a})
    reply = chat_once(looping, tok, "hi", temperature=0, max_new_tokens=5)
    assert "".join(reply) == "ababa" and reply.finish_reason == "length" and len(reply.tokens) == 5


def test_cached_turns_give_the_tokens_of_recomputing_the_whole_prompt(tok):
    m = make_model(tok, max_seq_len=128, init_std=0.5)
    s = ChatSession(m, tok, system="sys", max_new_tokens=6, temperature=0)
    for n, text in enumerate(["hello there", "tell me more", "ok"]):
        reply = s.send(text)
        list(reply)
        fresh = engine.generate(m, [reply.prompt_ids], 6, temperature=0, stop_ids=tok.stop_ids)[0]
        assert reply.tokens == fresh
        assert (reply.reused > 0) == (n > 0)  # later turns run only what follows the shared prefix
    # Sampling draws from one seeded stream for the session: the same settings give the same conversation.
    runs = []
    for _ in range(2):
        s = ChatSession(m, tok, max_new_tokens=6, temperature=1.0, top_k=None, seed=3)
        runs.append(["".join(s.send(t)) for t in ("a", "b")])
    assert runs[0] == runs[1]


def test_history_drops_the_oldest_turns_and_keeps_the_system_message(tok, replier):
    s = ChatSession(replier, tok, system="Be brief.", max_new_tokens=8, temperature=0)
    dropped_at = None
    for n in range(8):
        reply = s.send(f"m{n}")
        list(reply)
        assert len(reply.prompt_ids) + 8 <= 48
        if reply.dropped:
            dropped_at = n
            break
    assert dropped_at is not None and reply.dropped == 1
    kept = [m.content for m in s.history if m.role == "user"]
    assert s.history[0] == Message("system", "Be brief.") and kept == [f"m{i}" for i in range(1, dropped_at + 1)]
    assert reply.prompt_ids == prompt_ids(tok, s.history[:-1])
    # Keeping one more turn would not have fitted.
    assert len(prompt_ids(tok, [Message("system", "Be brief."), Message("user", "m0"), Message("assistant", "日x")]
                          + s.history[1:-1])) + 8 > 48  # fmt: skip
    before = s.history
    n = len(prompt_ids(tok, [Message("system", "Be brief."), Message("user", "word " * 40)]))
    with pytest.raises(ValueError) as e:
        s.send("word " * 40)
    assert str(e.value) == f"the prompt alone has {n} tokens and the model's context is 48 tokens: shorten the prompt"
    assert s.history == before


def scripted(lines: list[str], out: list[str]):
    def read_line(prompt: str) -> str:
        out.append(prompt)
        if not lines:
            raise EOFError
        line = lines.pop(0)
        if line == "^C":
            raise KeyboardInterrupt
        return line

    return read_line


def test_the_terminal_loop_runs_the_commands(tok, replier):
    s = ChatSession(replier, tok, max_new_tokens=8, temperature=0)
    out: list[str] = []
    lines = ["/system Be brief.", "hello", "", "/history", "/reset", "/history", "/bogus", "/system", "/exit", "never"]
    run_chat(s, scripted(lines, out), out.append)
    text = "".join(out)
    assert "日x\n" in text
    assert "system: Be brief.\nuser: hello\nassistant: 日x\n" in text
    assert "[conversation cleared]\n>>> system: Be brief.\n>>> unknown command /bogus" in text and "/reset" in text
    assert lines == ["never"] and s.history == [] and s.system is None
    # End of input and Ctrl-C at the prompt end the loop cleanly.
    for ending in ([], ["^C"]):
        run_chat(s, scripted(list(ending), []), [].append)


def test_ctrl_c_during_a_reply_stops_only_that_reply(tok, replier):
    s = ChatSession(replier, tok, max_new_tokens=8, temperature=0)
    out: list[str] = []

    def write(text: str) -> None:
        if text == "日" and not any("[interrupted]" in o for o in out):
            out.append(text)
            raise KeyboardInterrupt
        out.append(text)

    run_chat(s, scripted(["hi", "/history", "/exit"], out), write)
    text = "".join(out)
    assert "日 [interrupted]\n" in text and "assistant: 日\n" in text  # the partial reply is kept
    assert s.history == [Message("user", "hi"), Message("assistant", "日")]


def test_load_chat_reads_a_checkpoint(tmp_path, tok, replier):
    tok.save(tmp_path / "tokenizer.json")
    save_model(tmp_path / "ckpt", replier, replier.args, tokenizer_path=tmp_path / "tokenizer.json")
    s = load_chat(tmp_path / "ckpt", device="cpu", system="hi", max_new_tokens=4, temperature=0)
    assert "".join(s.send("x")) == "日x" and s.system == "hi"
    with pytest.raises(ValueError, match="max_new_tokens"):
        ChatSession(replier, tok, max_new_tokens=48)


def test_chat_and_generate_commands(tmp_path, tok, replier):
    from typer.testing import CliRunner

    from lmforge.cli import app

    tok.save(tmp_path / "tokenizer.json")
    ckpt = save_model(tmp_path / "ckpt", replier, replier.args, tokenizer_path=tmp_path / "tokenizer.json")
    runner = CliRunner()
    # Two turns, then /history shows the conversation kept between them, then /exit.
    chat = runner.invoke(app, ["chat", str(ckpt), "--temperature", "0", "-n", "6", "--device", "cpu"],
                         input="hello\nagain\n/history\n/exit\n")  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert chat.output.count("日x") >= 4  # two replies, and both again in the history
    assert "user: hello" in chat.output and "user: again" in chat.output  # the history kept both turns
    one = runner.invoke(app, ["generate", str(ckpt), "--chat", "-p", "hi", "--temperature", "0", "-n", "6"])
    assert one.exit_code == 0 and one.output == "日x\n"
    bad = runner.invoke(app, ["generate", str(ckpt), "--system", "s", "-p", "hi"])
    assert bad.exit_code == 2 and "--system goes with --chat" in bad.output
    capped = runner.invoke(app, ["chat", str(ckpt), "-n", "48"], input="/exit\n")  # replies of 24 tokens
    assert capped.exit_code == 0, capped.output


# --- evaluation through the chat template ---


@pytest.fixture
def generate_calls(monkeypatch):
    """Records the prompts and stop ids every `generate` call receives."""
    calls = []
    real = engine.generate

    def recording(model, prompts, max_new_tokens, **kw):
        calls.append((prompts, tuple(kw.get("stop_ids", ()))))
        return real(model, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(engine, "generate", recording)
    monkeypatch.setattr(code_eval, "generate", recording)
    return calls


def test_generation_tasks_prompt_through_the_template_only_when_asked(tmp_path, tok, long_replier, generate_calls):
    prompts = ["Say it:", "Again:"]
    f = tmp_path / "gen.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p, "reference": "日x"}) for p in prompts) + "\n")
    lm = from_lmforge(long_replier, tok)
    plain, _ = run_task(lm, "gen", f, EvalConfig(batch_size=1))
    assert [c[0] for c in generate_calls] == [[[tok.bos_id] + tok.encode(p)] for p in prompts]
    assert all(stops == () for _, stops in generate_calls) and "chat_template" not in plain
    generate_calls.clear()
    chat, _ = run_task(lm, "gen", f, EvalConfig(batch_size=1, chat_template=True))
    assert [c[0] for c in generate_calls] == [[user_prompt_ids(tok, p)] for p in prompts]
    assert all(set(stops) == {ids(tok, END), tok.eos_id} for _, stops in generate_calls)
    assert chat["exact_match"]["value"] == 1.0 and chat["chat_template"] is True
    generate_calls.clear()
    assert generate_until(lm, ["Question: 2+2?\nAnswer:"], max_new_tokens=4, chat=True, progress=False) == ["日x"]
    assert generate_calls[0][0] == [user_prompt_ids(tok, "Question: 2+2?\nAnswer:")]


def test_code_prompts_become_a_user_message_and_the_start_of_the_reply(tok, long_replier, generate_calls):
    prompt = "import os\n\ndef f(x):\n    '''Return x.'''\n"
    out = code_eval.generate_completions(long_replier, tok, [prompt], n=1, temperature=0, max_new_tokens=4,
                                         chat=True)  # fmt: skip
    assert generate_calls[0][0] == [user_prompt_ids(tok, prompt) + tok.encode(prompt)]
    assert set(generate_calls[0][1]) == {ids(tok, END), tok.eos_id} and len(out[0]) == 1
    # Too long for the context: leading lines go until the prompt fits twice.
    lines = [f"import m{i}\n" for i in range(40)] + ["def f(x):\n"]
    code_eval.generate_completions(long_replier, tok, ["".join(lines)], n=1, temperature=0, max_new_tokens=4,
                                   chat=True)  # fmt: skip
    sent = generate_calls[1][0][0]
    wrapped = ["".join(lines[i:]) for i in range(len(lines))]
    wrapped = [user_prompt_ids(tok, text) + tok.encode(text) for text in wrapped]
    assert sent == next(w for w in wrapped if len(w) <= 160 - 4) and len(sent) < len(wrapped[0])
    generate_calls.clear()
    code_eval.generate_completions(long_replier, tok, [prompt], n=1, temperature=0, max_new_tokens=4)
    assert generate_calls[0] == ([[tok.bos_id] + tok.encode(prompt)], ())


def test_imported_template_prompts_and_stops_at_its_end_of_turn(tmp_path):
    """An imported (ChatML, no BOS) tokenizer saved with a checkpoint: the chat prompt is the model's template with
    the generation prompt, and the reply stops at <|im_end|>, not only at EOS."""
    from helpers import hf_tokenizer_dir

    pytest.importorskip("transformers")
    hf_dir = hf_tokenizer_dir(tmp_path / "hf", "chatml")
    tok = Tokenizer.from_dir(hf_dir)
    im_end, x, y = ids(tok, "<|im_end|>"), tok.encode("x")[0], tok.encode("y")[0]
    assert tok.stop_ids == [im_end] and im_end != tok.token_to_id("<|endoftext|>")
    prompt = prompt_ids(tok, [Message("user", "hi")])
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    model = chain_model(tok, {prompt[-1]: x, tok.encode("hi")[-1]: x, x: im_end, im_end: y, y: y}, 64)
    ckpt = save_model(tmp_path / "ckpt", model, model.args, hf_dir / "tokenizer.json")
    assert (ckpt / "chat_template.jinja").read_bytes() == (hf_dir / "chat_template.jinja").read_bytes()
    session = load_chat(ckpt, device="cpu", max_new_tokens=8, temperature=0)
    reply = session.send("hi")
    assert reply.prompt_ids == prompt and "".join(reply) == "x" and reply.finish_reason == "stop"
    # Plain text stops at EOS (here <|im_end|> too); without the stop it would run on to "y".
    assert "".join(engine.stream_text(model, tok, "hi", 4, temperature=0)) == "x"
    assert engine.generate(model, [[tok.doc_start_id, *tok.encode("hi")]], 3, temperature=0)[0] == [x, im_end, y]
