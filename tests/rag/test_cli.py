"""`lmforge rag index|ask` and `lmforge chat --docs` end to end with a tiny model."""

import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.rag.answer import NOT_FOUND, check_citations, sources_message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import tiny_chat_model

    return tiny_chat_model(tmp_path_factory.mktemp("model"), max_seq_len=512)


def _docs(root):
    docs = root / "docs"
    docs.mkdir()
    (docs / "manual.md").write_text("# Bike\n\n## Brakes\n\nAdjust the brake cable tension with the barrel "
                                    "adjuster.\n\n## Chain\n\nLubricate the chain every 300 kilometres.\n")
    (docs / "tools.py").write_text("def pump(psi):\n    '''Inflate the tyre to psi pounds.'''\n    return psi\n")
    return docs


def test_index_then_ask_prints_the_answer_and_its_citations(tmp_path, tiny):
    runner = CliRunner()
    built = runner.invoke(app, ["rag", "index", str(_docs(tmp_path)), "-o", str(tmp_path / "idx")])
    assert built.exit_code == 0, built.output
    assert "2 files (0 unchanged, 2 added, 0 changed, 0 removed), 4 chunks" in built.output
    again = runner.invoke(app, ["rag", "index", str(tmp_path / "docs"), "-o", str(tmp_path / "idx")])
    assert "2 files (2 unchanged, 0 added" in again.output and "(0 new)" in again.output

    asked = runner.invoke(app, ["rag", "ask", str(tmp_path / "idx"), "How often to lubricate the chain?",
                                "--model", str(tiny), "-n", "16", "--json", "--device", "cpu"])  # fmt: skip
    assert asked.exit_code == 0, asked.output
    result = json.loads(asked.output)
    assert not result["refused"] and result["sources"][0] == "manual.md:7-9"
    from lmforge.rag import Index

    hits = Index.open(tmp_path / "idx").search("How often to lubricate the chain?", k=4)
    assert result["citations"] == [c.to_dict() for c in check_citations(result["answer"], hits)]

    plain = runner.invoke(app, ["rag", "ask", str(tmp_path / "idx"), "Who won the 1998 world cup final?",
                                "--model", str(tiny), "--device", "cpu"])  # fmt: skip
    assert plain.exit_code == 0 and plain.output.strip() == NOT_FOUND


def test_ask_lists_citations_with_their_verdicts(tmp_path, monkeypatch, tiny):
    runner = CliRunner()
    runner.invoke(app, ["rag", "index", str(_docs(tmp_path)), "-o", str(tmp_path / "idx")])
    # a model that always writes this answer: its citations are what the listing shows
    reply = "Lubricate the chain every 300 kilometres [1]. Pump the tyres daily [1]. See also [2]."
    import lmforge.infer.engine as engine

    monkeypatch.setattr(engine, "generate", lambda model, prompts, n, **kw: [_ids(tiny, reply)])
    asked = runner.invoke(app, ["rag", "ask", str(tmp_path / "idx"), "How often to lubricate the chain?",
                                "--model", str(tiny), "--k", "2", "--device", "cpu"])  # fmt: skip
    assert asked.exit_code == 0, asked.output
    lines = asked.output.strip().splitlines()
    assert lines[0] == reply
    # only the chain's chunk matches the question, so it is the one source: [2] names none
    assert lines[-3:] == ["  [1] manual.md:7-9 supported (support 1.00)",
                          "  [1] manual.md:7-9 unsupported (support 0.00)",
                          "  [2] invalid: no source 2 was given"]


def _ids(ckpt, text):
    from lmforge.model.io import load_checkpoint_tokenizer

    return load_checkpoint_tokenizer(ckpt).encode(text)


def test_missing_index_is_a_clear_error(tmp_path, tiny):
    out = CliRunner().invoke(app, ["rag", "ask", str(tmp_path / "none"), "q", "--model", str(tiny)])
    assert out.exit_code == 2 and "lmforge rag index" in out.output


def test_chat_with_docs_shows_the_model_the_sources_and_keeps_the_message_as_typed(tmp_path, tiny):
    from lmforge.finetune.data import Message
    from lmforge.finetune.template import prompt_ids
    from lmforge.infer.chat import load_chat
    from lmforge.rag import build_index, Index
    from lmforge.rag.answer import DocsAugmenter

    build_index(_docs(tmp_path), tmp_path / "idx")
    index = Index.open(tmp_path / "idx")
    session = load_chat(tiny, device="cpu", max_new_tokens=8, temperature=0.0)
    augmenter = DocsAugmenter(index, session.tokenizer, 400, k=2)
    session.augment = augmenter
    reply = session.send("brake cable tension")
    "".join(reply)
    shown = sources_message("brake cable tension", index.search("brake cable tension", k=2))
    assert reply.prompt_ids == prompt_ids(session.tokenizer, [Message("user", shown)])
    assert session.history[0] == Message("user", "brake cable tension")
    # After the reply: its sources by number and file:lines, then each [n] it cited, checked against its chunk.
    assert [hit.chunk.where for hit in augmenter.hits] == ["manual.md:3-5"]  # only the brakes section matches
    assert augmenter.notes("Adjust the brake cable tension [1]. Pump it [3].") == [
        "sources: [1] manual.md:3-5", "[1] manual.md:3-5 supported (support 1.00)",
        "[3] invalid: no source 3 was given"]
    assert augmenter("zzzz qqqq") == "zzzz qqqq"  # nothing retrieved: the message as typed
    assert augmenter.notes("x") == ["(no source was retrieved for this message)"]
    chat = CliRunner().invoke(app, ["chat", str(tiny), "--docs", str(tmp_path / "idx"), "--temperature", "0",
                                    "-n", "6", "--device", "cpu"], input="brake cable\n/exit\n")  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert "  sources: [1] manual.md:3-5" in chat.output
