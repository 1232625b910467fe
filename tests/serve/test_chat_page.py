"""The web chat page at `/` in a real browser: Debian's headless Chromium, driven by Selenium, against the server's
app (create_app) run by uvicorn on a loopback port. The engine behind it is mostly scripted (scripted_engine.py:
the engine contract's submit(), replying with a text the test chooses, at a pace it sets), so the page's behaviour
can be checked exactly: a reply streams in, the stop button cancels the request on the server, the conversation
and the settings survive a reload, the system prompt and sampling settings reach the engine, a refusal is shown,
an API key unlocks a keyed server, "use documents" shows the server's citations as links to the cited chunks, and
a hostile reply renders as text while its Markdown becomes elements. One test runs the real tiny model: the page
keeps its greedy reply.

A screenshot goes to the test's tmp dir; with LMFORGE_DOCS_SCREENSHOT=1 also to docs/img/chat.png. Without
chromium and chromedriver the tests skip, except under CI (see helpers.chromium_driver)."""

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from helpers import chromium_driver, tiny_chat_model, wait_for
from scripted_engine import LiveApp, ScriptedEngine

from lmforge.finetune.data import Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.batching import BatchEngine, SamplingParams
from lmforge.infer.loading import load_for_generation
from lmforge.rag.index import build_memory_index
from lmforge.serve.app import create_app
from lmforge.tokenizer import Tokenizer

DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "chat.png"
MODEL = "tiny-chat"
HOSTILE = ('<script>window.__xss = 1; alert(1)</script> <img src=x onerror="window.__xss = 2; alert(2)"> '
           '[click me](javascript:window.__xss=3) "><svg onload="window.__xss = 4">')  # fmt: skip
MARKDOWN = ("Here is **bold**, *italic* and `inline code`; see [the docs](https://example.org/docs).\n\n"
            "- first item\n- second item\n\n"
            "```python\ndef add(a, b):\n    return a + b  # <b>not bold</b>\n```\n")  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("chat_page"))


@pytest.fixture(scope="module")
def tok(checkpoint) -> Tokenizer:
    return Tokenizer.from_file(checkpoint.parent / "tok.json")


@pytest.fixture(scope="module")
def scripted(tok):
    engine = ScriptedEngine()
    with LiveApp(create_app(engine, tok, model_name=MODEL)) as url:
        yield engine, url


@pytest.fixture
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(lambda: by_id(driver, "model").text == MODEL, "the page to load the model's name from /v1/models")


def set_field(driver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def send(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    by_id(driver, "prompt").send_keys(text, Keys.ENTER)


def idle(driver) -> bool:
    return driver.find_element("tag name", "body").get_attribute("data-state") == "idle"


def messages(driver) -> list[tuple[str, str]]:
    """(role class, text of the content) of each message on the page."""
    boxes = driver.find_elements("css selector", "#messages .msg")
    return [(b.get_attribute("class").split()[1], b.find_element("css selector", ".content").text) for b in boxes]


def last_reply(driver) -> str:
    return driver.find_elements("css selector", "#messages .msg.assistant .content")[-1].text


def test_streams_a_reply_and_sends_the_settings(scripted, tok, browser):
    engine, url = scripted
    engine.reply, engine.delay = "The quick brown fox jumps over the lazy dog. " * 3, 0.05  # 45 pieces, 2.3 s
    open_page(browser, url)
    set_field(browser, "system", "You answer in one sentence.")
    for field, value in (("temperature", "0.3"), ("top_p", "0.9"), ("max_tokens", "40"), ("seed", "7")):
        set_field(browser, field, value)
    send(browser, "Tell me about foxes.")
    partial = wait_for(lambda: 0 < len(last_reply(browser)) < len(engine.reply.strip()) and last_reply(browser),
                       "part of the reply, before its end")  # fmt: skip
    assert engine.reply.startswith(partial)
    wait_for(lambda: idle(browser), "the reply to finish")
    assert messages(browser) == [("user", "Tell me about foxes."), ("assistant", engine.reply.strip())]
    ids, params = engine.requests[-1]
    assert ids == prompt_ids(tok, [Message("system", "You answer in one sentence."),
                                   Message("user", "Tell me about foxes.")])
    assert (params.temperature, params.top_p, params.max_tokens, params.seed) == (0.3, 0.9, 40, 7)
    # the status line reports the usage chunk the page asked for
    assert by_id(browser, "status").text == f"{len(ids)} prompt + {len(engine.handles[-1].pieces)} reply tokens"


def test_stop_cancels_the_request_on_the_server(scripted, browser):
    engine, url = scripted
    engine.reply, engine.delay = "word " * 200, 0.05  # 334 pieces: 17 s unless stopped
    open_page(browser, url)
    send(browser, "Talk for a long time.")
    wait_for(lambda: len(last_reply(browser)) > 10, "the reply to start streaming")
    by_id(browser, "stop").click()
    wait_for(lambda: idle(browser), "the page to stop", timeout=3)
    wait_for(lambda: engine.handles[-1].cancelled.is_set(), "the server to cancel the request", timeout=5)
    shown = last_reply(browser)
    assert 10 < len(shown) < len(engine.reply.strip()) and engine.reply.startswith(shown)
    note = browser.find_elements("css selector", "#messages .msg.assistant .note")
    assert [n.text for n in note] == ["stopped"]
    assert by_id(browser, "send").is_enabled() and not by_id(browser, "stop").is_enabled()


def test_conversation_and_settings_survive_a_reload(scripted, tok, browser):
    engine, url = scripted
    engine.reply, engine.delay = "Paris is the capital of France.", 0.0
    open_page(browser, url)
    set_field(browser, "system", "Be brief.")
    set_field(browser, "temperature", "0")
    send(browser, "What is the capital of France?")
    wait_for(lambda: idle(browser) and last_reply(browser) == engine.reply, "the first reply")
    before = messages(browser)
    browser.refresh()
    open_page(browser, url)
    assert messages(browser) == before
    assert by_id(browser, "system").get_attribute("value") == "Be brief."
    assert by_id(browser, "temperature").get_attribute("value") == "0"
    # the next request carries the restored history
    engine.reply = "About two million people."
    send(browser, "How many people live there?")
    wait_for(lambda: idle(browser) and last_reply(browser) == engine.reply, "the second reply")
    ids, params = engine.requests[-1]
    assert ids == prompt_ids(tok, [Message("system", "Be brief."), Message("user", "What is the capital of France?"),
                                   Message("assistant", "Paris is the capital of France."),
                                   Message("user", "How many people live there?")])  # fmt: skip
    assert params.temperature == 0
    by_id(browser, "new-chat").click()
    assert messages(browser) == []
    browser.refresh()
    open_page(browser, url)
    assert messages(browser) == []


def test_a_refused_request_shows_the_servers_error_and_stays_out_of_the_history(scripted, tok, browser):
    engine, url = scripted
    engine.reply = "Fine."
    open_page(browser, url)
    set_field(browser, "top_p", "5")
    n_requests = len(engine.requests)
    send(browser, "First try.")
    wait_for(lambda: idle(browser) and browser.find_elements("css selector", ".msg.failed"), "the refusal")
    note = browser.find_element("css selector", ".msg.failed .note.error").text
    assert note.startswith("HTTP 400: ") and "top_p" in note and len(engine.requests) == n_requests
    set_field(browser, "top_p", "1")
    send(browser, "Second try.")
    wait_for(lambda: idle(browser) and last_reply(browser) == "Fine.", "the reply")
    assert engine.requests[-1][0] == prompt_ids(tok, [Message("user", "First try."), Message("user", "Second try.")])


def test_a_hostile_reply_is_text_and_markdown_becomes_elements(scripted, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    engine, url = scripted
    engine.reply, engine.delay = HOSTILE + "\n\n" + MARKDOWN, 0.0
    policy = httpx.get(url + "/").headers["content-security-policy"]  # the page's script and style are files
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    open_page(browser, url)
    send(browser, "Show me something.")
    wait_for(lambda: idle(browser) and browser.find_elements("css selector", "#messages pre"), "the reply")
    assert browser.execute_script("return window.__xss") is None
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    reply = browser.find_elements("css selector", "#messages .msg.assistant .content")[-1]
    assert HOSTILE in reply.text  # tags, handlers and the javascript: link as the text they are
    for tag in ("script", "img", "svg"):
        assert reply.find_elements("tag name", tag) == []
    links = reply.find_elements("tag name", "a")
    assert [(a.get_attribute("href"), a.get_attribute("rel"), a.text) for a in links] == [
        ("https://example.org/docs", "noopener noreferrer", "the docs")]
    assert [e.text for e in reply.find_elements("tag name", "strong")] == ["bold"]
    assert [e.text for e in reply.find_elements("tag name", "em")] == ["italic"]
    assert [e.text for e in reply.find_elements("css selector", "li")] == ["first item", "second item"]
    assert [e.text for e in reply.find_elements("css selector", ":not(pre) > code")] == ["inline code"]
    code = reply.find_elements("css selector", "pre > code")
    assert [(c.get_attribute("class"), c.get_attribute("textContent")) for c in code] == [
        ("language-python", "def add(a, b):\n    return a + b  # <b>not bold</b>")]
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LMFORGE_DOCS_SCREENSHOT"):
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "chat.png", DOCS_SHOT)


def test_rag_citations_are_links_that_open_the_cited_chunk(scripted, browser):
    """The page's side of `"rag": true`: the request carries it, and the citations of the stream's last chunk (the
    server contract's n, file, start_line, end_line, supported, and the chunk's text) become [n] links in the reply
    and a list of file:line sources, each opening the panel with the chunk. The stream is played by a stand-in for
    fetch, so this checks the page alone."""
    _, url = scripted
    open_page(browser, url)
    citations = [{"n": 1, "file": "notes/paris.md", "start_line": 3, "end_line": 5, "supported": True,
                  "text": "Paris is the capital and largest city of France."},
                 {"n": 2, "file": "notes/rome.txt", "start_line": 7, "end_line": 7, "supported": False,
                  "text": "Rome is the capital of Italy. <b>not bold</b>"},
                 {"n": 5, "file": None, "start_line": None, "end_line": None, "supported": False, "valid": False,
                  "text": None}]  # fmt: skip
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Paris is the capital [1]"}}]},
              {"choices": [{"index": 0, "delta": {"content": " of France [2] [5] and [9]."}, "finish_reason": "stop"}],
               "citations": citations}]  # fmt: skip
    browser.execute_script("""
        const realFetch = window.fetch, sse = arguments[0];
        window.fetch = (url, init) => {
          if (url !== '/v1/chat/completions') return realFetch(url, init);
          window.__sent = JSON.parse(init.body);
          return Promise.resolve(new Response(sse, {headers: {'Content-Type': 'text/event-stream'}}));
        };""", "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")
    by_id(browser, "rag").click()
    send(browser, "What is the capital of France?")
    wait_for(lambda: idle(browser) and browser.find_elements("css selector", ".sources li"), "the cited reply")
    assert browser.execute_script("return window.__sent.rag") is True
    reply = browser.find_elements("css selector", "#messages .msg.assistant")[-1]
    assert reply.find_element("css selector", ".content").text == "Paris is the capital [1] of France [2] [5] and [9]."
    # [5] names no source the model was given: flagged, not a link; [9] is not among the citations: plain text
    inline = reply.find_elements("css selector", ".content .cite")
    assert [(a.tag_name, a.text, a.get_attribute("class")) for a in inline] == [
        ("a", "[1]", "cite"), ("a", "[2]", "cite unsupported"), ("span", "[5]", "cite invalid")]
    assert [a.get_attribute("title") for a in inline[:2]] == ["notes/paris.md:3-5", "notes/rome.txt:7"]
    assert [li.text for li in reply.find_elements("css selector", ".sources li")] == [
        "[1] notes/paris.md:3-5", "[2] notes/rome.txt:7", "[5] no such source"]
    sources = reply.find_elements("css selector", ".sources a.cite")
    assert not by_id(browser, "source").is_displayed()
    inline[1].click()
    wait_for(lambda: by_id(browser, "source").is_displayed(), "the source panel")
    assert by_id(browser, "source-title").text == "[2] notes/rome.txt:7"
    assert by_id(browser, "source-text").text == citations[1]["text"]
    assert "not supported" in by_id(browser, "source-note").text
    sources[0].click()
    assert by_id(browser, "source-text").text == citations[0]["text"] and by_id(browser, "source-note").text == ""
    by_id(browser, "source-close").click()
    assert not by_id(browser, "source").is_displayed()


def test_use_documents_answers_with_the_servers_checked_citations(tok, browser):
    """End to end with `--docs`: the server retrieves from an index, the scripted reply cites [1] and [2], and the
    page links each to the chunk the server says it cites, flagging the one the chunk does not support."""
    docs = [("paris.md", "Paris is the capital of France.\nThe Seine river flows through Paris."),
            ("lyon.md", "Lyon is a city in France.\nThe Rhone river flows through Lyon.")]
    engine = ScriptedEngine(max_seq_len=1024)
    engine.reply = "The Seine river flows through Paris [1]. Bananas are purple [2]."
    with LiveApp(create_app(engine, tok, model_name=MODEL, rag=build_memory_index(docs))) as url:
        open_page(browser, url)
        by_id(browser, "rag").click()
        send(browser, "Which river flows through Paris?")
        wait_for(lambda: idle(browser) and browser.find_elements("css selector", ".sources li"), "the cited reply")
        cited = [(a.text, a.get_attribute("class")) for a in browser.find_elements("css selector", ".content a.cite")]
        sources = [li.text for li in browser.find_elements("css selector", ".sources li")]
        browser.find_element("css selector", ".content a.cite").click()
        panel = wait_for(lambda: by_id(browser, "source").is_displayed() and by_id(browser, "source-text").text,
                         "the source panel")  # fmt: skip
    assert "Which river flows through Paris?" in tok.decode(engine.requests[-1][0])  # inside the sources message
    assert cited == [("[1]", "cite"), ("[2]", "cite unsupported")]
    assert sources == ["[1] paris.md:1-2", "[2] lyon.md:1-2"] and panel == docs[0][1]


def test_an_api_key_typed_on_the_page_unlocks_the_server(tok, browser):
    engine = ScriptedEngine()
    engine.reply = "Unlocked."
    with LiveApp(create_app(engine, tok, model_name=MODEL, api_keys=["s3cret-key"])) as url:
        browser.get(url + "/")  # the page itself needs no key; the API does
        wait_for(lambda: "HTTP 401" in by_id(browser, "status").text, "the API's refusal on the status line")
        set_field(browser, "api-key", "s3cret-key")
        wait_for(lambda: by_id(browser, "model").text == MODEL, "the model's name, with the key")
        assert by_id(browser, "status").text == ""
        send(browser, "Hello?")
        wait_for(lambda: idle(browser) and last_reply(browser) == "Unlocked.", "the reply")
        browser.refresh()  # the key is kept for the tab, not in localStorage with the conversation
        wait_for(lambda: by_id(browser, "model").text == MODEL, "the model's name after a reload")
        assert "s3cret-key" not in browser.execute_script("return localStorage.getItem('lmforge-chat')")


def test_the_page_shows_the_tiny_models_greedy_reply(checkpoint, tok, browser):
    """The real engine behind the page: the reply kept for the conversation is the model's greedy completion."""
    model, _ = load_for_generation(checkpoint, device="cpu")
    engine = BatchEngine(model, tok, max_batch=2)
    with LiveApp(create_app(engine, tok, model_name=MODEL)) as url:
        open_page(browser, url)
        set_field(browser, "temperature", "0")
        set_field(browser, "max_tokens", "12")
        send(browser, "Name a colour.")
        wait_for(lambda: idle(browser) and browser.find_elements("css selector", "#messages .msg.assistant"),
                 "the model's reply", timeout=30)  # fmt: skip
        kept = browser.execute_script("return JSON.parse(localStorage.getItem('lmforge-chat')).messages")
        expected = engine.generate(prompt_ids(tok, [Message("user", "Name a colour.")]),
                                   SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=tok.stop_ids))
    assert expected.completion_tokens > 0 and [m["role"] for m in kept] == ["user", "assistant"]
    assert kept[1]["content"] == expected.text and kept[1]["usage"]["completion_tokens"] == expected.completion_tokens


def test_a_stream_cut_off_before_done_is_an_error_and_an_empty_stopped_reply_stays_out_of_the_history(scripted,
                                                                                                     browser):
    """The server always ends a stream with `data: [DONE]`: a body that ends without it is a cut-off reply, shown
    as failed with what arrived, not as done. A reply stopped before its first token (content "") is not sent back
    as an assistant turn. The streams are played by a stand-in for fetch, so this checks the page alone."""
    _, url = scripted
    open_page(browser, url)
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Half a rep"}}]}
    browser.execute_script("""
        const sse = arguments[0];
        window.__sent = [];
        window.__mode = 'cut';
        window.fetch = ((realFetch) => (url, init) => {
          if (url !== '/v1/chat/completions') return realFetch(url, init);
          window.__sent.push(JSON.parse(init.body));
          if (window.__mode === 'cut') {
            return Promise.resolve(new Response(sse, {headers: {'Content-Type': 'text/event-stream'}}));
          }
          if (window.__mode === 'silent') {  // no token until the page aborts the request
            const body = new ReadableStream({start(c) {
              init.signal.addEventListener('abort', () => c.error(new DOMException('aborted', 'AbortError')));
            }});
            return Promise.resolve(new Response(body, {headers: {'Content-Type': 'text/event-stream'}}));
          }
          return Promise.resolve(new Response('data: [DONE]\\n\\n', {headers: {'Content-Type': 'text/event-stream'}}));
        })(window.fetch);""", f"data: {json.dumps(chunk)}\n\n")
    send(browser, "Cut me off.")
    wait_for(lambda: idle(browser) and browser.find_elements("css selector", ".msg.failed"), "the cut-off reply")
    failed = browser.find_element("css selector", ".msg.failed")
    assert "assistant" in failed.get_attribute("class").split()
    assert failed.find_element("css selector", ".content").text == "Half a rep"
    assert failed.find_element("css selector", ".note.error").text == "the stream ended before it was complete"
    kept = browser.execute_script("return JSON.parse(localStorage.getItem('lmforge-chat')).messages")
    assert kept[1]["error"] == "the stream ended before it was complete" and not kept[1].get("done")
    # a reply stopped before any token
    browser.execute_script("window.__mode = 'silent'")
    send(browser, "Say nothing.")
    wait_for(lambda: not idle(browser), "the request to start")
    by_id(browser, "stop").click()
    wait_for(lambda: idle(browser), "the page to stop", timeout=3)
    assert [n.text for n in browser.find_elements("css selector", "#messages .msg.assistant .note")] == [
        "the stream ended before it was complete", "stopped"]
    browser.execute_script("window.__mode = 'done'")
    send(browser, "Third try.")
    wait_for(lambda: idle(browser) and browser.execute_script("return window.__sent.length") == 3, "the third request")
    sent = browser.execute_script("return window.__sent[2].messages")
    assert sent == [{"role": "user", "content": "Cut me off."}, {"role": "user", "content": "Say nothing."},
                    {"role": "user", "content": "Third try."}]
