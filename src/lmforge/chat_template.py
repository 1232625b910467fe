"""Chat templates: the token ids of a conversation, which of them SFT trains on, the prompt that asks for the next
assistant message, and the token that ends an assistant turn. One interface (`ChatTemplate`), two implementations.

`NativeChatTemplate`, for lmforge's own tokenizer: a conversation renders as
    <|bos|> <|role|> content <|end|> <|role|> content <|end|> ... [<|eos|> after a final assistant message]
with the role and control ids inserted directly (never through `encode`). The final EOS teaches generation to
stop; a prompt for generation is the conversation so far + `<|assistant|>`. `CHAT_TEMPLATE_JINJA` is the same
template for a Hugging Face export.

`JinjaChatTemplate`, for an imported model: the model's own template, rendered to text as transformers renders it
(a sandboxed Jinja environment with trim_blocks / lstrip_blocks, `raise_exception`, `strftime_now`, `tojson`, the
special tokens' text as `bos_token`, `eos_token`, ... and `add_generation_prompt`); the text is then tokenized
whole with special tokens' text parsed into their ids, so the ids are those of transformers'
`apply_chat_template(..., tokenize=True)`. Where lmforge deliberately differs: a message whose content contains a
special token's text ("<|im_start|>") has that content encoded on its own with no special token parsed, so text
in the data can never forge a control token (transformers would emit the control token).

Targets (what SFT trains on) for a Jinja template: each content is located exactly by rendering it wrapped in
private-use marker characters (around it, or inside its leading and trailing whitespace for templates that
`| trim` it, whichever renders the same text as the content alone), removing them and keeping the character spans; the tokens overlapping an assistant
message's span are targets, and so are the template's tokens after it up to and including the first special token
(the end-of-turn token: `<|im_end|>`, `<|eot_id|>`, `</s>`). That token is also the template's `end_of_turn_ids`,
found by rendering a sample conversation. The first token of a conversation is never a target, which keeps packed
conversations apart.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

from jinja2 import Template, TemplateError, TemplateSyntaxError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

TRAIN_ON = ("assistant", "all", "last")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"

# lmforge's template for Hugging Face `tokenizer_config.json` (`chat_template`). One line, so that transformers'
# trim_blocks / lstrip_blocks never add or remove whitespace. With add_generation_prompt it ends in <|assistant|>;
# without, a final assistant message gets the EOS, exactly like `NativeChatTemplate.render`.
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% elif messages and messages[-1]['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}"
)

# Message i's content is wrapped in chr(_OPEN + i) ... chr(_CLOSE + i): Unicode's supplementary private-use planes
# 15 and 16, which no real text uses.
_OPEN, _CLOSE = 0xF0000, 0x100000
_MARKER = re.compile("[\U000f0000-\U0010ffff]")
_SAMPLE = (("user", "Hi"), ("assistant", "Hello"))  # renders the end-of-turn token


class ChatError(ValueError):
    """A chat template that fails to render, or that lmforge cannot use; the message names the template's line."""


class ChatMessage(Protocol):
    role: str
    content: str


@dataclass
class _Message:
    role: str
    content: str


class ChatTemplate(ABC):
    """How conversations become ids (see the module docstring)."""

    def render(self, conversation: Sequence[ChatMessage], train_on: str = "assistant") -> tuple[list[int], list[bool]]:
        """The conversation's ids and, aligned with them, whether each is a training target. train_on="assistant":
        each assistant message's content and its end-of-turn tokens; "last": only the last assistant message's;
        "all": every token but the first."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be 'assistant', 'all' or 'last', got {train_on!r}")
        if not conversation:
            raise ValueError("cannot render an empty conversation")
        return self._render(conversation, train_on)

    @abstractmethod
    def _render(self, conversation: Sequence[ChatMessage], train_on: str) -> tuple[list[int], list[bool]]: ...

    @abstractmethod
    def prompt_ids(self, conversation: Sequence[ChatMessage]) -> list[int]:
        """The ids that prompt generation of the next assistant message."""

    @property
    @abstractmethod
    def end_of_turn_ids(self) -> list[int]:
        """The token(s) that end an assistant turn."""


class NativeChatTemplate(ChatTemplate):
    """lmforge's template on its reserved role tokens (see the module docstring)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def _special(self, token: str) -> int:
        found = self.tok.token_to_id(token)
        if found is None:
            raise ValueError(f"tokenizer lacks the chat token {token!r}; retrain it with the tokenizer stage")
        return found

    def _render(self, conversation: Sequence[ChatMessage], train_on: str) -> tuple[list[int], list[bool]]:
        last_assistant = max((i for i, m in enumerate(conversation) if m.role == "assistant"), default=-1)
        end_id = self._special(END)
        ids, targets = [self.tok.bos_id], [False]
        for i, message in enumerate(conversation):
            if message.role not in ROLE_TOKENS:
                raise ValueError(f"message {i} has unknown role {message.role!r}; expected one of {list(ROLE_TOKENS)}")
            body = self.tok.encode(message.content) + [end_id]
            if i == len(conversation) - 1 and message.role == "assistant":
                body.append(self.tok.eos_id)
            trained = (
                train_on == "all"
                or (train_on == "assistant" and message.role == "assistant")
                or (train_on == "last" and i == last_assistant)
            )
            ids += [self._special(ROLE_TOKENS[message.role]), *body]
            # The role token is a target only under "all": the model is told who speaks, it does not predict it.
            targets += [train_on == "all", *[trained] * len(body)]
        return ids, targets

    def prompt_ids(self, conversation: Sequence[ChatMessage]) -> list[int]:
        """The conversation so far + `<|assistant|>`."""
        ids = [self.tok.bos_id]
        for message in conversation:
            ids += [self._special(ROLE_TOKENS[message.role]), *self.tok.encode(message.content), self._special(END)]
        return ids + [self._special(ROLE_TOKENS["assistant"])]

    @property
    def end_of_turn_ids(self) -> list[int]:
        return [self._special(END)]


class JinjaChatTemplate(ChatTemplate):
    """An imported model's own Jinja template over its tokenizer (see the module docstring). `tok` gives
    `encode_with_offsets`, `special_ids` and `hf`; `variables` are the special tokens' text the template sees."""

    def __init__(self, tok: Any, source: str, variables: dict[str, str], origin: str) -> None:
        self.tok, self.variables, self.origin = tok, variables, origin
        try:
            self._template = _compile(source)
        except TemplateSyntaxError as e:
            raise ChatError(f"chat template of {origin}, line {e.lineno}: {e.message}") from e
        self._specials = frozenset(tok.special_ids)
        texts = sorted({tok.hf.id_to_token(i) for i in self._specials}, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._end_of_turn: list[int] | None = None

    def text(self, conversation: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        """The rendered text, as transformers' apply_chat_template(tokenize=False) gives it."""
        return self._text([{"role": m.role, "content": m.content} for m in conversation], add_generation_prompt)

    def _text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.variables)  # fmt: skip
        except Exception as e:  # the template's own code failed: say where
            raise ChatError(f"chat template of {self.origin}{_template_line(e)}: {type(e).__name__}: {e}") from e

    def _located(self, conversation: Sequence[ChatMessage], add_generation_prompt: bool) -> tuple[str, dict]:
        """(the rendered text, message index -> the character spans of its content in the text)."""
        for i, m in enumerate(conversation):
            if _MARKER.search(m.content):
                raise ChatError(f"message {i} contains characters of Unicode planes 15-16 (private use), which "
                                "lmforge uses to locate message contents in a rendered chat template")  # fmt: skip
        plain = self.text(conversation, add_generation_prompt)
        # Markers around the whole content first; inside its whitespace where the template trims it.
        for inside in (False, True):
            marked = [{"role": m.role, "content": _wrap(m.content, i, inside)} for i, m in enumerate(conversation)]
            text, spans = _unmark(self._text(marked, add_generation_prompt))
            if text == plain:
                return text, spans
        raise ChatError(f"the chat template of {self.origin} changes message contents beyond trimming whitespace, "
                        "so lmforge cannot locate them to mask the loss")  # fmt: skip

    def _forged(self, text: str, spans: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int]]:
        """The content spans that hold a special token's text."""
        if self._special_text is None:
            return []
        return sorted(s for ss in spans.values() for s in ss if self._special_text.search(text, s[0], s[1]))

    def _encode(self, text: str, forged: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text`, special tokens parsed except inside the `forged` spans."""
        if not forged:
            return self.tok.encode_with_offsets(text, parse_special=True)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for a, b in [*forged, (len(text), len(text))]:
            for x, y, parse in ((pos, a, True), (a, b, False)):
                if x < y:
                    piece_ids, piece_offsets = self.tok.encode_with_offsets(text[x:y], parse_special=parse)
                    ids += piece_ids
                    offsets += [(s + x, e + x) for s, e in piece_offsets]
            pos = b
        return ids, offsets

    def _render(self, conversation: Sequence[ChatMessage], train_on: str) -> tuple[list[int], list[bool]]:
        text, spans = self._located(conversation, add_generation_prompt=False)
        ids, offsets = self._encode(text, self._forged(text, spans))
        if train_on == "all":
            return ids, [k > 0 for k in range(len(ids))]
        targets = [False] * len(ids)
        assistants = [i for i, m in enumerate(conversation) if m.role == "assistant"]
        starts = sorted(a for ss in spans.values() for a, _ in ss)
        for i in assistants[-1:] if train_on == "last" else assistants:
            for a, b in spans.get(i, []):
                stop_at = next((s for s in starts if s >= b and s > a), len(text) + 1)
                self._mark(targets, ids, offsets, (a, b), stop_at)
        targets[0] = False
        return ids, targets

    def _mark(self, targets: list[bool], ids: list[int], offsets: list[tuple[int, int]], span: tuple[int, int],
              stop_at: int) -> None:  # fmt: skip
        """Mark the tokens of a content span, then the template's tokens after it up to and including the first
        special one (never reaching the next content, which starts at `stop_at`)."""
        a, b = span
        inside = [k for k, (s, e) in enumerate(offsets) if s < b and e > a]
        first, k = (inside[0], inside[-1] + 1) if inside else (_first_at(offsets, a),) * 2
        for j in range(first, k):
            targets[j] = True
        while k < len(ids) and offsets[k][0] < stop_at:
            targets[k] = True
            if ids[k] in self._specials:
                break
            k += 1

    def prompt_ids(self, conversation: Sequence[ChatMessage]) -> list[int]:
        """The conversation rendered with add_generation_prompt=True."""
        text = self.text(conversation, add_generation_prompt=True)
        if self._special_text is None or not any(self._special_text.search(m.content) for m in conversation):
            return self.tok.encode_with_offsets(text, parse_special=True)[0]
        text, spans = self._located(conversation, add_generation_prompt=True)
        return self._encode(text, self._forged(text, spans))[0]

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The special token that follows an assistant message in a rendered sample conversation (none when the
        template puts none there, or cannot render the sample)."""
        if self._end_of_turn is None:
            try:
                ids, targets = self.render([_Message(r, c) for r, c in _SAMPLE], "last")
            except ChatError as e:
                log.warning("cannot find the end-of-turn token of %s's chat template: %s", self.origin, e)
                ids, targets = [], []
            trained = [t for t, on in zip(ids, targets) if on]
            self._end_of_turn = trained[-1:] if trained and trained[-1] in self._specials else []
        return self._end_of_turn


def _wrap(content: str, i: int, inside_whitespace: bool) -> str:
    """`content` with message i's markers around it, or inside its leading and trailing whitespace."""
    if not inside_whitespace:
        return f"{chr(_OPEN + i)}{content}{chr(_CLOSE + i)}"
    core = content.strip()
    lead = content[: len(content) - len(content.lstrip())] if core else content
    trail = content[len(lead) + len(core) :]
    return f"{lead}{chr(_OPEN + i)}{core}{chr(_CLOSE + i)}{trail}"


def _unmark(marked: str) -> tuple[str, dict[int, list[tuple[int, int]]]]:
    """The text without markers, and each message's content spans in it."""
    pieces: list[str] = []
    spans: dict[int, list[tuple[int, int]]] = {}
    opened: dict[int, int] = {}
    pos = last = 0
    for m in _MARKER.finditer(marked):
        pieces.append(marked[last : m.start()])
        pos, last = pos + m.start() - last, m.end()
        code = ord(m.group())
        if code < _CLOSE:
            opened[code - _OPEN] = pos
        elif (start := opened.pop(code - _CLOSE, None)) is not None:
            spans.setdefault(code - _CLOSE, []).append((start, pos))
        else:
            raise ChatError("the chat template cuts a message's content apart, so lmforge cannot locate it")
    if opened:
        raise ChatError("the chat template cuts a message's content apart, so lmforge cannot locate it")
    pieces.append(marked[last:])
    return "".join(pieces), spans


def _first_at(offsets: list[tuple[int, int]], pos: int) -> int:
    return next((k for k, (s, _) in enumerate(offsets) if s >= pos), len(offsets))


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' marker of assistant text) renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> Template:
    """The template in a sandbox: no attribute that reaches Python internals, no mutation of what it is given."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _template_line(e: BaseException) -> str:
    """", line N" of the template where `e` was raised (Jinja puts the template's lines in the traceback)."""
    line, tb = getattr(e, "lineno", None), e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f", line {line}" if line else ""
