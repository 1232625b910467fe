"""Every refusal of the server in OpenAI's error format, with its status, type, param and code (the app in process,
over the real engine on a tiny model), and the `lmforge serve` verb's own refusals."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from serve_live import KEY, MODEL, serve_checkpoint
from typer.testing import CliRunner

from lmforge.cli import app as cli_app
from lmforge.infer.batching import BatchEngine
from lmforge.infer.loading import load_for_generation
from lmforge.serve.app import create_app
from lmforge.serve.cli import api_keys

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BODY_LIMIT = 4000


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_generation(serve_checkpoint(tmp_path_factory.mktemp("errors")), "cpu")


@pytest.fixture(scope="module")
def http(loaded):
    model, tok = loaded
    app = create_app(BatchEngine(model, tok, max_batch=2), tok, model_name=MODEL, api_keys=[KEY, "sk-other"],
                     max_body_bytes=BODY_LIMIT)  # fmt: skip
    with TestClient(app, headers=AUTH) as client:
        yield client


def error(r, status: int, type_: str, code: str | None = None, param: str | None = None) -> str:
    """Assert `r` is OpenAI's error body with these fields; its message."""
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert (body["type"], body["code"], body["param"]) == (type_, code, param), body
    return body["message"]


def test_malformed_json_and_a_non_object_are_400(http):
    error(http.post("/v1/chat/completions", content=b'{"model": '), 400, "invalid_request_error", "invalid_json")
    error(http.post("/v1/completions", json=[1, 2]), 400, "invalid_request_error", "invalid_json")


@pytest.mark.parametrize("change, param", [
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
])  # fmt: skip
def test_a_bad_field_is_400_naming_it(http, change, param):
    message = error(http.post("/v1/chat/completions", json=CHAT | change), 400, "invalid_request_error",
                    "invalid_value", param)  # fmt: skip
    assert message.startswith(param)


def test_a_missing_field_is_400_naming_it(http):
    body = {k: v for k, v in CHAT.items() if k != "messages"}
    assert "messages" in error(http.post("/v1/chat/completions", json=body), 400, "invalid_request_error",
                               "invalid_value", "messages")  # fmt: skip


@pytest.mark.parametrize("change, param", [({"n": 2}, "n"), ({"echo": True}, "echo"), ({"prompt": []}, "prompt")])
def test_what_the_server_cannot_honour_is_400_naming_it(http, change, param):
    body = {"model": MODEL, "prompt": "x"} | change
    error(http.post("/v1/completions", json=body), 400, "invalid_request_error", "unsupported_value", param)


def test_token_ids_outside_the_vocabulary_are_400(http):
    error(http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 10**6]}), 400, "invalid_request_error",
          "invalid_value", "prompt")  # fmt: skip


def test_an_unknown_model_is_404(http):
    message = error(http.post("/v1/chat/completions", json=CHAT | {"model": "gpt-4"}), 404, "not_found_error",
                    "model_not_found", "model")  # fmt: skip
    assert "'gpt-4'" in message and repr(MODEL) in message


def test_a_prompt_longer_than_the_context_is_400(http, loaded):
    model, tok = loaded
    too_long = [tok.doc_start_id] * model.args.max_seq_len
    message = error(http.post("/v1/completions", json={"model": MODEL, "prompt": too_long}), 400,
                    "invalid_request_error", "context_length_exceeded", "prompt")  # fmt: skip
    assert str(model.args.max_seq_len) in message


def test_max_tokens_is_capped_to_the_context(http, loaded):
    model, tok = loaded
    prompt = [tok.doc_start_id] * (model.args.max_seq_len - 3)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 500, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_a_body_over_the_limit_is_413(http):
    big = CHAT | {"messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
    error(http.post("/v1/chat/completions", json=big), 413, "invalid_request_error", "request_too_large")

    def chunks():  # no Content-Length: the limit holds while the body is read
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    error(http.post("/v1/completions", content=chunks()), 413, "invalid_request_error", "request_too_large")


def test_a_bad_api_key_is_401_and_any_configured_key_works(http):
    for headers in ({"Authorization": "Bearer sk-nope"}, {"Authorization": ""}, {"Authorization": f"Basic {KEY}"}):
        r = http.post("/v1/chat/completions", json=CHAT, headers=headers)
        error(r, 401, "authentication_error", "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    error(http.get("/metrics", headers={"Authorization": ""}), 401, "authentication_error", "invalid_api_key")
    assert http.get("/v1/models", headers={"Authorization": "Bearer sk-other"}).status_code == 200


def test_an_unknown_route_is_404_in_openai_format(http):
    error(http.get("/v1/nothing"), 404, "not_found_error")


def test_while_shutting_down_requests_get_503(http):
    state = http.app.state.serving
    state.draining = True
    try:
        error(http.post("/v1/chat/completions", json=CHAT), 503, "service_unavailable", "shutting_down")
        assert http.get("/health").json() == {"status": "draining"}
    finally:
        state.draining = False
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_keys_come_from_the_option_and_the_environment():
    assert api_keys(["a", " b "], "c, ,a,d") == ["a", "b", "c", "d"]
    assert api_keys([], None) == []


def test_binding_beyond_loopback_without_a_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("LMFORGE_API_KEYS", raising=False)
    r = CliRunner().invoke(cli_app, ["serve", str(tmp_path / "no-such-ckpt"), "--host", "0.0.0.0"])
    assert r.exit_code == 2
    assert "--api-key" in r.output and "LMFORGE_API_KEYS" in r.output and "127.0.0.1" in r.output
