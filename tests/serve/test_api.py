"""`lmforge serve` as a client sees it: a live server in a subprocess (started once for the module) driven by the
official `openai` client, its answers checked against lmforge's own generate, chat template and embeddings."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from serve_live import KEY, MODEL, ServeProcess, metric, serve_checkpoint, sse_events, wait_for_metric

from lmforge.embed import embed_texts
from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import generate
from lmforge.infer.loading import load_for_generation

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}]
AUTH = {"Authorization": f"Bearer {KEY}"}
# Greedy, the tiny model answers this without ever ending its turn, so the reply runs to max_tokens.
ENDLESS = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return serve_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    # With drafts, so every greedy test below also checks that speculative decoding leaves the output as it was.
    with ServeProcess(checkpoint, log, "--api-key", KEY, "--max-concurrency", "2", "--draft", "4") as s:
        yield s


@pytest.fixture(scope="module")
def local(checkpoint):
    return load_for_generation(checkpoint, "cpu")


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_greedy_completion_equals_generate_and_counts_its_tokens(client, local):
    model, tok = local
    ids = [tok.doc_start_id, *tok.encode("The capital of France")]
    expected = generate(model, [ids], 40, temperature=0, stop_ids=tok.stop_ids)[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France", max_tokens=40, temperature=0)
    assert r.choices[0].text == tok.decode(expected)
    stopped = len(expected) < 40
    assert r.choices[0].finish_reason == ("stop" if stopped else "length")
    # the stop token is generated (and counted) though its text is not returned
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(expected) + stopped)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=40, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_completion_stream_joins_to_the_whole_text(client, server):
    whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_usage_counts_the_templates_ids_and_the_reply_is_greedy(client, local):
    model, tok = local
    ids = prompt_ids(tok, [Message(m["role"], m["content"]) for m in MESSAGES])
    expected = generate(model, [ids], 25, temperature=0, stop_ids=tok.stop_ids)[0]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=25, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(expected)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == len(ids) + r.usage.completion_tokens


def test_chat_stream_in_openai_chunks_then_usage_then_done(server, client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)


def test_chat_logprobs_of_a_greedy_reply_are_the_top_ones(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_ignore_eos_generates_exactly_max_tokens(client, local):
    model, tok = local
    ids = [tok.doc_start_id, *tok.encode("The capital of France")]
    natural = generate(model, [ids], 60, temperature=0, stop_ids=tok.stop_ids)[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France", max_tokens=60, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"
    plain = client.completions.create(model=MODEL, prompt="The capital of France", max_tokens=60, temperature=0)
    assert plain.usage.completion_tokens == len(natural)
    # A chat reply goes past its end of turn too (the template's stop ids are dropped as well).
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert chat.usage.completion_tokens == 60


def test_ignore_eos_drops_the_templates_stop_ids_too():
    from lmforge.serve.schemas import ChatRequest

    req = ChatRequest(model=MODEL, messages=MESSAGES, ignore_eos=True)
    assert req.sampling_params(10, [5, 6]).stop_token_ids == [] and req.sampling_params(10, [5, 6]).ignore_eos
    assert ChatRequest(model=MODEL, messages=MESSAGES).sampling_params(10, [5, 6]).stop_token_ids == [5, 6]


def test_seeded_sampling_repeats(client):
    kwargs = dict(model=MODEL, prompt="Colours:", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_embeddings_are_the_checkpoints_mean_pooled_unit_vectors(client, local):
    model, tok = local
    texts = ["a red apple", "the json module", "x"]
    r = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (3, model.args.d_model)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, embed_texts(model, tok, texts, max_len=model.args.max_seq_len), atol=1e-5)
    assert r.usage.prompt_tokens == sum(1 + len(tok.encode(t)) for t in texts)
    plain = client.embeddings.create(model=MODEL, input="x", encoding_format="float")
    np.testing.assert_allclose(plain.data[0].embedding, got[2], atol=1e-6)


def test_a_wrong_or_missing_api_key_is_refused(server):
    for key in ("sk-wrong", ""):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "none", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as e:
                c.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # health needs no key


def _open_stream(server, max_tokens: int = 900) -> tuple[httpx.Client, httpx.Response, Iterator[str]]:
    """A chat stream whose first chunk has arrived (the request is running in the engine), and its lines (kept:
    a line iterator dropped half-read closes the response)."""
    http = httpx.Client(timeout=30)
    body = {"model": MODEL, "messages": ENDLESS, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    r = http.send(http.build_request("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH),
                  stream=True)  # fmt: skip
    assert r.status_code == 200
    lines = r.iter_lines()
    next(lines)
    return http, r, lines


def test_a_client_leaving_mid_stream_cancels_its_request(server, client):
    before = metric(httpx.get(f"{server.url}/metrics", headers=AUTH).text, "lmforge_generations_total",
                    'reason="cancelled"')  # fmt: skip
    http, r, _ = _open_stream(server)
    wait_for_metric(server.url, "lmforge_running_requests", 1)
    r.close()
    http.close()
    text = wait_for_metric(server.url, "lmforge_generations_total", before + 1, labels='reason="cancelled"')
    wait_for_metric(server.url, "lmforge_running_requests", 0)
    assert metric(text, "lmforge_http_requests_in_flight") == 0
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert client.completions.create(model=MODEL, prompt="Still", max_tokens=3, temperature=0).usage.completion_tokens


def test_a_client_leaving_before_a_whole_response_cancels_its_request(server, client):
    before = metric(httpx.get(f"{server.url}/metrics", headers=AUTH).text, "lmforge_generations_total",
                    'reason="cancelled"')  # fmt: skip
    body = json.dumps({"model": MODEL, "messages": ENDLESS, "max_tokens": 900, "temperature": 0}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head + body)
        wait_for_metric(server.url, "lmforge_running_requests", 1)
    # The socket is closed before any byte of the response: the request must end as "cancelled", not run on.
    wait_for_metric(server.url, "lmforge_generations_total", before + 1, labels='reason="cancelled"')
    text = wait_for_metric(server.url, "lmforge_running_requests", 0)
    assert metric(text, "lmforge_http_requests_in_flight") == 0
    assert client.completions.create(model=MODEL, prompt="Still", max_tokens=3, temperature=0).usage.completion_tokens


def test_requests_beyond_the_concurrency_limit_get_429(server, client):
    opened = [_open_stream(server), _open_stream(server)]  # the server was started with --max-concurrency 2
    try:
        assert metric(httpx.get(f"{server.url}/metrics", headers=AUTH).text, "lmforge_http_requests_in_flight") == 2
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="one more", max_tokens=3)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
    finally:
        for http, r, _ in opened:
            r.close()
            http.close()
    wait_for_metric(server.url, "lmforge_http_requests_in_flight", 0)
    assert client.completions.create(model=MODEL, prompt="now", max_tokens=3).usage.completion_tokens == 3


def test_metrics_count_requests_and_tokens(server, client):
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    before = metric(text, "lmforge_requests_total", 'route="/v1/completions",status="200"')
    out_before = metric(text, "lmforge_completion_tokens_total")
    r = client.completions.create(model=MODEL, prompt="Count", max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert metric(text, "lmforge_requests_total", 'route="/v1/completions",status="200"') == before + 1
    assert metric(text, "lmforge_completion_tokens_total") == out_before + r.usage.completion_tokens
    assert metric(text, "lmforge_time_to_first_token_seconds_count") >= 1
    drafted, accepted = metric(text, "lmforge_draft_tokens_total"), metric(text, "lmforge_draft_tokens_accepted_total")
    assert drafted > 0 and 0 <= accepted <= drafted  # the greedy tests before this one drafted
    assert "# TYPE lmforge_inter_token_seconds histogram" in text


def test_sigterm_finishes_the_stream_in_flight_then_exits_0(checkpoint, tmp_path):
    # The reply runs to max_tokens: a stream cut by the shutdown would end short, or without its last chunks.
    body = {"model": MODEL, "messages": ENDLESS, "max_tokens": 600, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with ServeProcess(checkpoint, tmp_path / "server.log") as s:
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            events = sse_events([first, *lines])
        code = s.proc.wait(30)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{s.url}/health", timeout=2)
    assert events[-1] == "[DONE]"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 600
    assert code == 0, s.log_tail()
    assert "stopped by SIGTERM" in s.log_tail()


def test_the_chat_page_and_its_files_are_served_without_a_key(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(f"{server.url}/static/chat.js")
    assert script.status_code == 200 and "/v1/chat/completions" in script.text
