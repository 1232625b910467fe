// A small Markdown renderer for model replies that builds DOM nodes with textContent only: model text never goes
// through innerHTML, so no tag, attribute or entity in a reply can become markup. Supported: paragraphs, headings,
// fenced code blocks (with a language class), bullet and numbered lists, inline code, bold, italic, links (http and
// https only; anything else stays text) and [n] citation markers (the caller decides what they become).
(function () {
  "use strict";
  var FENCE = /^\s*```\s*([^`\s]*)\s*$/;
  var HEADING = /^(#{1,6})\s+(.*)$/;
  var BULLET = /^\s*[-*+]\s+(.*)$/;
  var NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
  // one alternative per inline form; the first that matches at the leftmost place wins
  // (underscores only between non-word characters: snake_case and __dunder__ names stay as written)
  var INLINE = new RegExp([
    "`([^`\\n]+)`", "\\*\\*([^*\\n]+?)\\*\\*", "(?<!\\w)__([^_\\n]+?)__(?!\\w)", "\\*([^*\\s][^*\\n]*?)\\*",
    "(?<!\\w)_([^_\\n]+)_(?!\\w)", "\\[([^\\]\\n]+)\\]\\(([^)\\s]+)\\)", "\\[(\\d{1,3})\\]"
  ].join("|"), "g");

  function el(tag, className) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    return node;
  }

  function safeUrl(url) {
    // only absolute http(s) URLs become links: javascript:, data:, relative paths and the like stay text
    if (!/^https?:\/\//i.test(url)) {
      return null;
    }
    try {
      var parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (e) {
      return null;
    }
  }

  function appendText(parent, text) {
    var lines = text.split("\n");
    for (var i = 0; i < lines.length; i++) {
      if (i > 0) {
        parent.appendChild(el("br"));
      }
      if (lines[i]) {
        parent.appendChild(document.createTextNode(lines[i]));
      }
    }
  }

  function link(label, url, options) {
    var href = safeUrl(url);
    if (!href) {
      return null;
    }
    var a = el("a");
    a.setAttribute("href", href);
    a.setAttribute("rel", "noopener noreferrer");
    a.setAttribute("target", "_blank");
    inline(a, label, options);
    return a;
  }

  function inline(parent, text, options) {
    var last = 0;
    var match;
    INLINE.lastIndex = 0;
    var found = [];
    while ((match = INLINE.exec(text)) !== null) {  // collect first: the recursion below reuses INLINE
      found.push({index: match.index, groups: match.slice(), end: INLINE.lastIndex});
    }
    found.forEach(function (m) {
      appendText(parent, text.slice(last, m.index));
      last = m.end;
      var g = m.groups;
      var node = null;
      if (g[1] !== undefined) {
        node = el("code");
        node.textContent = g[1];
      } else if (g[2] !== undefined || g[3] !== undefined) {
        node = el("strong");
        inline(node, g[2] !== undefined ? g[2] : g[3], options);
      } else if (g[4] !== undefined || g[5] !== undefined) {
        node = el("em");
        inline(node, g[4] !== undefined ? g[4] : g[5], options);
      } else if (g[6] !== undefined) {
        node = link(g[6], g[7], options);
      } else if (g[8] !== undefined && options.citation) {
        node = options.citation(parseInt(g[8], 10));
      }
      if (node) {
        parent.appendChild(node);
      } else {
        appendText(parent, g[0]);  // an unsafe link or an unknown citation: its text, as written
      }
    });
    appendText(parent, text.slice(last));
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line);
  }

  function codeBlock(lines, i, out) {
    var language = lines[i].match(FENCE)[1].replace(/[^\w+#-]/g, "");
    var body = [];
    for (i += 1; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) {
      body.push(lines[i]);
    }
    var pre = el("pre");
    var code = el("code", language ? "language-" + language : "");
    code.textContent = body.join("\n");  // an unclosed fence (a reply still streaming) runs to the end
    pre.appendChild(code);
    out.appendChild(pre);
    return i + 1;
  }

  function list(lines, i, out, pattern, tag, options) {
    var node = el(tag);
    for (; i < lines.length && pattern.test(lines[i]); i++) {
      var item = el("li");
      inline(item, lines[i].match(pattern)[1], options);
      node.appendChild(item);
    }
    out.appendChild(node);
    return i;
  }

  function render(text, options) {
    options = options || {};
    var out = document.createDocumentFragment();
    var lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    var i = 0;
    while (i < lines.length) {
      var line = lines[i];
      var heading = line.match(HEADING);
      if (!line.trim()) {
        i += 1;
      } else if (FENCE.test(line)) {
        i = codeBlock(lines, i, out);
      } else if (heading) {
        var h = el("h" + Math.min(6, heading[1].length + 2));  // h3..h6: a reply sits under the page's own headings
        inline(h, heading[2], options);
        out.appendChild(h);
        i += 1;
      } else if (BULLET.test(line)) {
        i = list(lines, i, out, BULLET, "ul", options);
      } else if (NUMBERED.test(line)) {
        i = list(lines, i, out, NUMBERED, "ol", options);
      } else {
        var para = [line];
        for (i += 1; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) {
          para.push(lines[i]);
        }
        var p = el("p");
        inline(p, para.join("\n"), options);
        out.appendChild(p);
      }
    }
    return out;
  }

  window.lmforgeMarkdown = {render: render, safeUrl: safeUrl};
})();
