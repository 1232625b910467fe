"""Chat requests with `"rag": true`: the refusal without the model, the grounded prompt, citations in the body and
in the stream's last chunk (the app in process, over the real engine on a tiny model and an in-memory index)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from serve_live import MODEL, serve_checkpoint

from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.batching import BatchEngine
from lmforge.infer.loading import load_for_generation
from lmforge.rag import build_memory_index
from lmforge.rag.answer import NOT_FOUND, check_citations, sources_message
from lmforge.serve.app import create_app
from lmforge.serve.rag import K, ground

DOCS = [("guide.md", "The torque for the wheel bolts is 120 newton metres.\n\nCheck tyre pressure monthly."),
        ("faq.md", "The warranty lasts three years from the date of purchase.")]  # fmt: skip
COVERED = "How long does the warranty last after purchase?"
UNCOVERED = "Who painted the Mona Lisa in Florence?"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_generation(serve_checkpoint(tmp_path_factory.mktemp("rag")), "cpu")


@pytest.fixture(scope="module")
def index():
    return build_memory_index(DOCS)


@pytest.fixture(scope="module")
def http(loaded, index):
    model, tok = loaded
    with TestClient(create_app(BatchEngine(model, tok, max_batch=2), tok, model_name=MODEL, rag=index)) as client:
        yield client


def chat(question: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "rag": True, "max_tokens": 8,
            "temperature": 0} | fields  # fmt: skip


def test_an_uncovered_question_is_refused_without_the_model(http):
    r = http.post("/v1/chat/completions", json=chat(UNCOVERED)).json()
    assert r["choices"][0]["message"]["content"] == NOT_FOUND and r["citations"] == []
    assert r["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    lines = http.post("/v1/chat/completions", json=chat(UNCOVERED, stream=True)).text.split("\n\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == NOT_FOUND
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["citations"] == []
    assert lines[-2] == "data: [DONE]"


def test_a_covered_question_is_answered_from_the_numbered_sources(http, loaded, index):
    model, tok = loaded
    r = http.post("/v1/chat/completions", json=chat(COVERED)).json()
    hits = index.search(COVERED, k=K)
    grounded = prompt_ids(tok, [Message("user", sources_message(COVERED, hits))])
    assert r["usage"]["prompt_tokens"] == len(grounded)
    text = r["choices"][0]["message"]["content"]
    assert r["citations"] == [c.to_dict() | {"text": c.chunk.text if c.chunk else None}
                              for c in check_citations(text, hits)]  # fmt: skip
    lines = http.post("/v1/chat/completions", json=chat(COVERED, stream=True)).text.split("\n\n")
    last = [json.loads(line[6:]) for line in lines if line.startswith("data: {")][-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["citations"] == r["citations"]


def test_a_replys_markers_become_checked_citations_with_file_lines_and_text(loaded, index):
    _, tok = loaded
    grounded = ground(index, tok, [Message("system", "Be brief."), Message("user", COVERED)], budget=1000)
    assert grounded.refusal is None and grounded.conversation[0] == Message("system", "Be brief.")
    n = 1 + [h.chunk.file for h in index.search(COVERED, k=K)].index("faq.md")
    cites = grounded.cite(f"The warranty lasts three years [{n}]. Bolts are made of cheese [{n}]. See [9].")
    assert [(c["n"], c["file"], c["start_line"], c["supported"], c["valid"]) for c in cites] == [
        (n, "faq.md", 1, True, True), (n, "faq.md", 1, False, True), (9, None, None, False, False)]
    assert cites[0]["text"] == DOCS[1][1]


def test_rag_without_an_index_or_without_a_question_last_is_400(http, loaded):
    model, tok = loaded
    with TestClient(create_app(BatchEngine(model, tok, max_batch=1), tok, model_name=MODEL)) as bare:
        r = bare.post("/v1/chat/completions", json=chat(COVERED))
    assert r.status_code == 400 and r.json()["error"]["param"] == "rag" and "--docs" in r.json()["error"]["message"]
    body = chat(COVERED) | {"messages": [{"role": "user", "content": COVERED}, {"role": "assistant", "content": "x"}]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
