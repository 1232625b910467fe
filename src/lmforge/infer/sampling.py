"""Per-request sampling for the batching engine: the parameters, the logits they sample from, and stop strings.

The order a step applies them, on one request's logits [V] (fp32):

1. `repetition_penalty` (Hugging Face's definition, CTRL paper): every token id seen so far, in the prompt or the
   output, has its logit divided by the penalty when positive and multiplied by it when negative.
2. `presence_penalty` / `frequency_penalty` (OpenAI's definition): over the generated tokens only,
   logit -= frequency_penalty * count + presence_penalty * (count > 0).
3. temperature == 0 picks the argmax here (greedy); otherwise logits / temperature, then `top_k` (keep the k
   largest), `top_p` (keep the smallest set of top tokens whose probability reaches p), `min_p` (drop tokens whose
   probability is below min_p times the top token's), in that order, each on the result of the one before.

Logprobs are the log-softmax of the logits after those steps: the distribution the token was actually drawn from
(filtered tokens have -inf). For greedy requests the temperature step is skipped, so they are the log-softmax of
the penalised logits (the model's own distribution when no penalty is set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """One request's sampling settings; `validate` raises ValueError naming the field and its value."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # go on past the tokenizer's stop ids (stop_token_ids still stop): for benchmarks

    def validate(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k is None or self.top_k >= 1, "None or an integer >= 1"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "None or in (0, 1]"),
            ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "None or in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "a list of token ids >= 0"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "in [0, 20]"),
        ]  # fmt: skip
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"sampling parameter {name}={getattr(self, name)!r} must be {want}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"sampling parameter top_logprobs={self.top_logprobs} needs logprobs=True")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits [..., V] with everything below the k-th largest set to -inf (ties with it stay)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits [..., V] keeping the smallest set of top tokens whose probability reaches p (the top one always)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach p.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def keep_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits [..., V] dropping tokens whose probability is below p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def sampling_logits(
    logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The logits [V] one request samples from (see the module docstring for the order).

    `seen` [V] bool marks the ids in the prompt and output (repetition penalty); `counts` [V] counts each id in the
    output (presence and frequency penalties). Either may be None when its penalties are off.
    """
    x = logits.float()
    r = params.repetition_penalty
    if r != 1.0 and seen is not None:
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        x = x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if params.temperature == 0:
        return x
    x = x / params.temperature
    if params.top_k is not None:
        x = keep_top_k(x, params.top_k)
    if params.top_p is not None:
        x = keep_top_p(x, params.top_p)
    if params.min_p:
        x = keep_min_p(x, params.min_p)
    return x


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The token drawn from `sampling_logits`' result: the argmax when greedy, else a draw from its softmax."""
    if params.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


class StopText:
    """The text of one request's tokens, released as deltas that never contain (or start) a stop string.

    Tokens whose text ends in an incomplete UTF-8 character (U+FFFD) wait for the next token; text that could be
    the start of a stop string is held back until the next token decides it. `push` returns (delta, stopped):
    on a stop string the text is cut before it. `flush` releases what is held at the end of the request.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:  # noqa: ANN001 (a lmforge Tokenizer)
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.pending: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if piece.endswith("\ufffd"):
            return "", False
        self.pending = []
        # A stop string not found before this piece must end inside it.
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._partial()), False

    def flush(self) -> str:
        if self.pending:  # a request cut mid-character ends with a replacement character for it
            self.text += self.tokenizer.decode(self.pending, skip_special_tokens=True)
            self.pending = []
        return self._release(len(self.text))

    def _partial(self) -> int:
        """The length of the longest end of the text that starts some stop string."""
        for n in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, end: int) -> str:
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
