// The web chat page: streams replies from /v1/chat/completions (server-sent events read from fetch's body), keeps
// the conversation and settings in localStorage, stops a reply by aborting its fetch (the server then cancels the
// request), and shows a RAG reply's [n] citations as links that open the cited chunk. Replies are rendered by
// markdown.js, which builds DOM nodes with textContent only; the page's Content-Security-Policy allows no inline
// script or style, so nothing here uses either.
(function () {
  "use strict";
  var STORE = "lmforge-chat";
  var KEY_STORE = "lmforge-chat-api-key";  // sessionStorage: a key is not kept beyond the tab
  var FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed"];
  var $ = function (id) { return document.getElementById(id); };
  var state = load();
  var model = null;
  var running = null;  // {controller, message} while a reply streams

  function load() {
    var empty = {messages: [], settings: {}};
    try {
      var saved = JSON.parse(localStorage.getItem(STORE) || "null");
      if (saved && Array.isArray(saved.messages) && saved.settings && typeof saved.settings === "object") {
        saved.messages = saved.messages.filter(function (m) {
          return m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string";
        });
        return saved;
      }
    } catch (e) {
      console.warn("lmforge chat: the saved conversation is unreadable; starting a new one", e);
    }
    return empty;
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(state));
    } catch (e) {
      setStatus("could not save the conversation in this browser: " + e.message, true);
    }
  }

  function setStatus(text, isError) {
    var status = $("status");
    status.textContent = text;
    status.className = isError ? "status error" : "status";
  }

  function headers() {
    var h = {"Content-Type": "application/json"};
    var key = $("api-key").value.trim();
    if (key) {
      h.Authorization = "Bearer " + key;
    }
    return h;
  }

  function number(id, parse) {
    var text = $(id).value.trim();
    if (!text) {
      return null;
    }
    var value = parse(text);
    return isFinite(value) ? value : null;
  }

  function requestBody() {
    var system = $("system").value.trim();
    // a reply that failed (an error, no text from the model) or has no text (stopped before its first token) is
    // shown but is not part of the conversation
    var history = state.messages.filter(function (m) {
      return m !== running.message && !m.error && !(m.role === "assistant" && !m.content);
    });
    var body = {
      model: model,
      messages: (system ? [{role: "system", content: system}] : []).concat(history.map(function (m) {
        return {role: m.role, content: m.content};
      })),
      stream: true,
      stream_options: {include_usage: true}
    };
    [["temperature", parseFloat], ["top_p", parseFloat], ["max_tokens", parseInt], ["seed", parseInt]]
      .forEach(function (field) {
        var value = number(field[0], field[1]);
        if (value !== null) {
          body[field[0]] = value;
        }
      });
    if ($("rag").checked) {
      body.rag = true;  // an lmforge extension: answer from the server's --docs index, with citations
    }
    return body;
  }

  // ---- rendering -------------------------------------------------------------------------------------------

  function citationLabel(c) {
    if (typeof c.page === "number") {
      return c.file + " p. " + c.page;
    }
    var lines = c.start_line === c.end_line ? c.start_line : c.start_line + "-" + c.end_line;
    return c.file + ":" + lines;
  }

  // a marker whose number names no retrieved source (the server's "valid": false): flagged, not a link
  function invalidCite(n, text) {
    var span = document.createElement("span");
    span.className = "cite invalid";
    span.title = "[" + n + "] names no source given to the model";
    span.textContent = text;
    return span;
  }

  function showSource(c) {
    $("source-title").textContent = "[" + c.n + "] " + citationLabel(c);
    $("source-note").textContent = c.supported === false
      ? "Flagged: the answer's sentence is not supported by this chunk." : "";
    $("source-text").textContent = typeof c.text === "string" ? c.text : "(the server sent no chunk text)";
    $("source").hidden = false;
  }

  function citeLink(c, text) {
    var a = document.createElement("a");
    a.className = c.supported === false ? "cite unsupported" : "cite";
    a.setAttribute("href", "#source");
    a.title = citationLabel(c);
    a.textContent = text;
    a.addEventListener("click", function (event) {
      event.preventDefault();
      showSource(c);
    });
    return a;
  }

  function citeNode(c, text) {
    return c.file ? citeLink(c, text) : invalidCite(c.n, text);
  }

  function citationsOf(message) {
    var byN = {};
    (message.citations || []).forEach(function (c) { byN[c.n] = c; });
    return byN;
  }

  function renderMessage(message) {
    var box = document.createElement("div");
    box.className = "msg " + message.role + (message.error ? " failed" : "");
    var role = document.createElement("div");
    role.className = "role";
    role.textContent = message.role === "user" ? "You" : "Assistant";
    box.appendChild(role);
    var body = document.createElement("div");
    body.className = "content";
    if (message.role === "user") {
      body.textContent = message.content;  // what the user typed is shown as typed
    } else {
      var byN = citationsOf(message);
      body.appendChild(window.lmforgeMarkdown.render(message.content, {
        citation: function (n) { return byN[n] ? citeNode(byN[n], "[" + n + "]") : null; }
      }));
    }
    box.appendChild(body);
    if (message.citations && message.citations.length) {
      var sources = document.createElement("ol");
      sources.className = "sources";
      message.citations.forEach(function (c) {
        var item = document.createElement("li");
        item.appendChild(c.file ? citeLink(c, "[" + c.n + "] " + citationLabel(c))
          : invalidCite(c.n, "[" + c.n + "] no such source"));
        sources.appendChild(item);
      });
      box.appendChild(sources);
    }
    var note = message.error || (message.stopped ? "stopped" : "");
    if (note) {
      var noteBox = document.createElement("div");
      noteBox.className = message.error ? "note error" : "note";
      noteBox.textContent = note;
      box.appendChild(noteBox);
    }
    return box;
  }

  function render() {
    var list = $("messages");
    list.replaceChildren.apply(list, state.messages.map(renderMessage));
    list.scrollTop = list.scrollHeight;
  }

  var pending = false;
  function renderSoon() {  // one repaint (and save: a reload keeps the partial reply) per animation frame
    if (!pending) {
      pending = true;
      requestAnimationFrame(function () { pending = false; render(); save(); });
    }
  }

  // ---- streaming -------------------------------------------------------------------------------------------

  function onChunk(data, message) {
    var chunk = JSON.parse(data);
    if (chunk.error) {
      throw new Error(chunk.error.message || "the server reported an error");
    }
    var choice = (chunk.choices || [])[0];
    if (choice && choice.delta && typeof choice.delta.content === "string") {
      message.content += choice.delta.content;
    }
    if (choice && choice.finish_reason) {
      message.finish_reason = choice.finish_reason;
    }
    if (Array.isArray(chunk.citations)) {
      message.citations = chunk.citations;
    }
    if (chunk.usage) {
      message.usage = chunk.usage;
    }
  }

  // One SSE event: its data lines joined; true at [DONE].
  function onEvent(event, message) {
    var data = event.split("\n").filter(function (line) { return line.indexOf("data:") === 0; })
      .map(function (line) { return line.slice(5).replace(/^ /, ""); }).join("\n");
    if (!data) {
      return false;
    }
    if (data === "[DONE]") {
      return true;
    }
    onChunk(data, message);
    renderSoon();
    return false;
  }

  // Reads the stream's events into message; true when it ended with [DONE], false when the body ended before it.
  async function readStream(response, message) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    for (;;) {
      var part = await reader.read();
      if (part.done) {
        return false;
      }
      buffer = (buffer + decoder.decode(part.value, {stream: true})).replace(/\r\n/g, "\n");
      var end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        var event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (onEvent(event, message)) {
          return true;
        }
      }
    }
  }

  async function errorText(response) {
    try {
      var body = await response.json();
      return (body.error && body.error.message) || JSON.stringify(body);
    } catch (e) {
      return response.statusText;
    }
  }

  function setRunning(value) {
    running = value;
    document.body.setAttribute("data-state", value ? "streaming" : "idle");
    $("send").disabled = !!value;
    $("stop").disabled = !value;
  }

  async function send(text) {
    var message = {role: "assistant", content: ""};
    state.messages.push({role: "user", content: text}, message);
    setRunning({controller: new AbortController(), message: message});
    render();
    save();
    try {
      var response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: running.controller.signal
      });
      if (!response.ok) {
        message.error = "HTTP " + response.status + ": " + await errorText(response);
      } else {
        if (await readStream(response, message)) {
          message.done = true;
        } else {  // the server always ends with [DONE]: without it the reply was cut off
          message.error = "the stream ended before it was complete";
        }
      }
    } catch (e) {
      if (e.name === "AbortError") {
        message.stopped = true;
      } else {
        message.error = e.message;
      }
    }
    setRunning(null);
    setStatus(message.usage ? message.usage.prompt_tokens + " prompt + " + message.usage.completion_tokens +
              " reply tokens" : "", false);
    render();
    save();
  }

  // ---- wiring ----------------------------------------------------------------------------------------------

  async function loadModel() {
    try {
      var response = await fetch("/v1/models", {headers: headers()});
      if (!response.ok) {
        setStatus("GET /v1/models: HTTP " + response.status + ": " + await errorText(response), true);
        return;
      }
      var models = (await response.json()).data || [];
      model = models.length ? models[0].id : null;
      $("model").textContent = model || "";
      setStatus(model ? "" : "the server lists no model", !model);
    } catch (e) {
      setStatus("the server does not answer: " + e.message, true);
    }
  }

  function restoreSettings() {
    FIELDS.forEach(function (id) {
      if (typeof state.settings[id] === "string") {
        $(id).value = state.settings[id];
      }
      $(id).addEventListener("change", function () { state.settings[id] = $(id).value; save(); });
    });
    $("rag").checked = state.settings.rag === true;
    $("rag").addEventListener("change", function () { state.settings.rag = $("rag").checked; save(); });
    $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
    $("api-key").addEventListener("change", function () {
      sessionStorage.setItem(KEY_STORE, $("api-key").value);
      loadModel();
    });
  }

  $("composer").addEventListener("submit", function (event) {
    event.preventDefault();
    var text = $("prompt").value.trim();
    if (!text || running) {
      return;
    }
    if (!model) {
      setStatus("no model: the server's /v1/models did not answer", true);
      return;
    }
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", function () {
    if (running) {
      running.controller.abort();
    }
  });
  $("new-chat").addEventListener("click", function () {
    if (running) {
      running.controller.abort();
    }
    state.messages = [];
    save();
    render();
  });
  $("source-close").addEventListener("click", function () { $("source").hidden = true; });

  // a reply that was streaming when the page was left is kept as far as it got
  state.messages.forEach(function (m) {
    if (m.role === "assistant" && !m.done && !m.error) {
      m.stopped = true;
    }
  });
  restoreSettings();
  render();
  loadModel();
})();
