"""Chat with a model through the chat template it was fine-tuned on: a session with history, and a terminal loop.

Every prompt is `lmforge.finetune.template.prompt_ids` of the conversation so far (the system message, the turns,
the new user message) in the tokenizer's chat template (lmforge's own, ending in `<|assistant|>`, or an imported
model's): the same ids SFT trained on, the evaluation prompts with `eval.chat_template` and the export's Hugging
Face `chat_template`. A reply ends before the template's end-of-turn token (`<|end|>`) or EOS.

A session keeps one KV cache. Each prompt shares its start with the previous prompt and reply, so only the tokens
after the longest common prefix are run: a turn costs its own tokens, not the whole conversation again. (The
prefix is compared by id, because a reply re-encoded from its text may not be the ids that were sampled.)

When the conversation and `max_new_tokens` no longer fit the model's context, the oldest user/assistant turns
are dropped (the system message is kept) and the reply says how many; a message too long to leave
`max_new_tokens` even then gets a shorter reply (logged), and one that leaves no room at all raises ValueError.
`load_chat` caps `max_new_tokens` to half the context, so that a conversation keeps the other half; `chat_once`
(one message) caps it to what the prompt leaves.

    session = load_chat("runs/x/sft/final", system="Answer briefly.", temperature=0.7)
    run_chat(session)  # /reset, /system TEXT, /history, /exit; EOF or Ctrl-C at the prompt ends it
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.finetune.data import Conversation, Message
from lmforge.finetune.template import prompt_ids
from lmforge.infer.engine import cap_new_tokens, check_sampling, decode_stream, make_generator, stream_tokens
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

PROMPT = ">>> "
COMMANDS = {
    "/system TEXT": "set the system message (/system alone removes it); the turns are kept",
    "/reset": "forget the turns (the system message stays)",
    "/history": "show the conversation the model sees",
    "/exit": "end the chat (so do /quit, Ctrl-D and Ctrl-C at the prompt)",
    "/help": "show these commands",
}



def user_prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids that prompt the reply to `text` as the only message (evaluation's chat prompts)."""
    return prompt_ids(tokenizer, [Message("user", text)])


def _with_system(system: str | None, turns: Conversation) -> Conversation:
    return ([Message("system", system)] if system else []) + turns


class Reply:
    """One assistant reply, streaming: iterate it for the text pieces as they are generated.

    `prompt_ids` is the prompt it answers, `reused` how many of those came from the session's cache, `dropped`
    how many old turns were dropped to fit, `max_new_tokens` its length limit (the session's, or less when the
    prompt leaves less room). The reply joins the session's history (with the user message) when
    the iteration ends, at `<|end|>` or EOS (`finish_reason` "stop") or after max_new_tokens ("length"), or when
    it is closed early ("interrupted", keeping the text generated so far). `text` is then the whole reply.
    """

    def __init__(self, session: ChatSession, user: Message, prompt: list[int], keep_from: int, dropped: int,
                 max_new_tokens: int) -> None:  # fmt: skip
        self.prompt_ids = prompt
        self.dropped = dropped
        self.max_new_tokens = max_new_tokens
        self.reused = session._reuse(prompt)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._pieces = self._run(session, user, keep_from)

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating; a reply already started keeps what it has."""
        self._pieces.close()

    def _collect(self, tokens: Iterator[int]) -> Iterator[int]:
        for t in tokens:
            self.tokens.append(t)
            yield t

    def _run(self, s: ChatSession, user: Message, keep_from: int) -> Iterator[str]:
        tokens = stream_tokens(
            s.model, self.prompt_ids, self.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            stop_ids=s.tokenizer.stop_ids, generator=s._generator, cache=s._cache,
        )  # fmt: skip
        try:
            yield from decode_stream(s.tokenizer, self._collect(tokens))
            self.finish_reason = "length" if len(self.tokens) == self.max_new_tokens else "stop"
        except (GeneratorExit, KeyboardInterrupt):
            self.finish_reason = "interrupted"
            raise
        finally:
            tokens.close()  # feeds nothing more to the cache, so what it holds is known
            s._cached = (self.prompt_ids + self.tokens)[: s._cache.pos]
            if self.finish_reason is not None:  # any other error leaves the conversation as it was
                self.text = s.tokenizer.decode(self.tokens)
                s._turns = s._turns[keep_from:] + [user, Message("assistant", self.text)]


class ChatSession:
    """A conversation with a model: an optional system message, the user/assistant turns so far, the sampling
    settings, and the KV cache that lets each turn run only its own tokens (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> None:
        check_sampling(temperature, top_k, top_p)
        if not 0 < max_new_tokens < model.args.max_seq_len:
            raise ValueError(f"max_new_tokens must be in [1, {model.args.max_seq_len}) (the model's max_seq_len), "
                             f"got {max_new_tokens}")  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self._generator = make_generator(model, seed)  # one random stream for the whole session: reproducible
        self._turns: Conversation = []
        self._cache = KVCache.for_model(model, 1)
        self._cached: list[int] = []  # the ids whose keys and values the cache holds
        self._reply: Reply | None = None
        # What the model is shown for a user message (`lmforge chat --docs`: the message with retrieved sources);
        # only this turn's prompt carries it, the history keeps the message as typed.
        self.augment: Callable[[str], str] | None = None
        # Lines the terminal chat prints after a finished reply (`--docs`: its sources and checked citations).
        self.annotate: Callable[[str], list[str]] | None = None

    @property
    def system(self) -> str | None:
        return self._system

    @system.setter
    def system(self, text: str | None) -> None:
        self._system = text if text and text.strip() else None

    @property
    def history(self) -> Conversation:
        """The conversation the next prompt continues: the system message (if any), then the turns."""
        return _with_system(self.system, list(self._turns))

    def reset(self) -> None:
        """Forget the turns; the system message and the settings stay."""
        self._finish_reply()
        self._turns = []

    def send(self, text: str) -> Reply:
        """Add a user message and start the reply (iterate it to stream the text; see `Reply`)."""
        self._finish_reply()
        user = Message("user", text)
        shown = Message("user", self.augment(text)) if self.augment else user
        limit = self.model.args.max_seq_len - self.max_new_tokens
        keep_from = 0
        ids = prompt_ids(self.tokenizer, self.history + [shown])
        while len(ids) > limit and keep_from < len(self._turns):
            keep_from += 2  # a user message and its reply
            ids = prompt_ids(self.tokenizer, _with_system(self.system, self._turns[keep_from:] + [shown]))
        # Raises when the prompt alone fills the context; a shorter reply is logged.
        max_new = cap_new_tokens(self.max_new_tokens, self.model.args.max_seq_len, len(ids))
        self._reply = Reply(self, user, ids, keep_from, keep_from // 2, max_new)
        return self._reply

    def _finish_reply(self) -> None:
        """Close a reply still streaming, so that turns are never interleaved."""
        if self._reply is not None:
            self._reply.close()
            self._reply = None

    def _reuse(self, prompt: list[int]) -> int:
        """Rewind the cache to the longest prefix it shares with `prompt` (at least the last prompt token is run)."""
        n = 0
        for a, b in zip(self._cached, prompt[:-1]):
            if a != b:
                break
            n += 1
        self._cache.pos = n
        self._cached = self._cached[:n]
        return n


def chat_once(model: Transformer, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 256,
              system: str | None = None, **settings: Any) -> Reply:  # fmt: skip
    """The streaming reply to `prompt` as a single user message (`lmforge generate --chat`), at most
    max_new_tokens long or what the prompt leaves of the context (logged). `settings` are ChatSession's:
    temperature, top_k, top_p, seed. A prompt that fills the context raises ValueError."""
    ids = prompt_ids(tokenizer, _with_system(system, [Message("user", prompt)]))
    max_new = cap_new_tokens(max_new_tokens, model.args.max_seq_len, len(ids))
    return ChatSession(model, tokenizer, system=system, max_new_tokens=max_new, **settings).send(prompt)


def load_chat(checkpoint: str | Path, *, device: str = "auto", max_new_tokens: int = 256,
              **settings: Any) -> ChatSession:  # fmt: skip
    """A ChatSession with the model and tokenizer of an lmforge checkpoint or its Hugging Face export; replies of
    at most max_new_tokens or half the model's context (logged), the rest kept for the conversation. `settings`
    are ChatSession's."""
    from lmforge.infer.loading import load_for_generation

    model, tokenizer = load_for_generation(Path(checkpoint), device)
    max_new = cap_new_tokens(max_new_tokens, model.args.max_seq_len)
    return ChatSession(model, tokenizer, max_new_tokens=max_new, **settings)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_chat(
    session: ChatSession,
    read_line: Callable[[str], str] = input,
    write: Callable[[str], None] = _write_stdout,
) -> None:
    """The terminal chat: read a line, stream the reply; the commands are in COMMANDS. It returns at /exit,
    /quit, end of input or Ctrl-C at the prompt; Ctrl-C during a reply stops that reply only."""
    write("Chat: type a message, or /help for the commands.\n")
    while True:
        try:
            line = read_line(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, write):
                return
            continue
        try:
            reply = session.send(line)
        except ValueError as e:
            write(f"error: {e}\n")
            continue
        if reply.dropped:
            write(f"[dropped the oldest {reply.dropped} turn(s) to fit the model's "
                  f"{session.model.args.max_seq_len}-token context]\n")  # fmt: skip
        try:
            for piece in reply:
                write(piece)
        except KeyboardInterrupt:
            reply.close()
            write(" [interrupted]")
        write("\n")
        if session.annotate is not None:
            for note in session.annotate(reply.text):
                write(f"  {note}\n")


def _command(session: ChatSession, line: str, write: Callable[[str], None]) -> bool:
    """Run one /command; False when the chat should end."""
    name, _, arg = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        write("[conversation cleared]\n")
    elif name == "/system":
        session.system = arg.strip() or None
        write(f"[system message: {session.system}]\n" if session.system else "[system message removed]\n")
    elif name == "/history":
        for m in session.history:
            write(f"{m.role}: {m.content}\n")
        if not session.history:
            write("[no messages yet]\n")
    else:
        if name != "/help":
            write(f"unknown command {name}\n")
        write("".join(f"  {c:<14} {what}\n" for c, what in COMMANDS.items()))
    return True
