"""The request bodies of the OpenAI-compatible routes (pydantic), and their mapping to the engine's SamplingParams.

Fields OpenAI defines that this server does not act on (user, logit_bias, service_tier, ...) are accepted and
ignored, as OpenAI's own server ignores what a model does not support; a field it cannot honour with a different
meaning (n > 1, echo, best_of > 1, tools) is refused with a 400 naming it. `top_k`, `min_p` and
`repetition_penalty` are lmforge extensions (vLLM names them the same).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.infer.batching import SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit


class Unsupported(ValueError):
    """A field set to a value this server cannot honour; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    top_k: int | None = Field(None, ge=1)  # extension
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # extension
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens whatever the model says; load tests use it

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {stops!r}")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def check_supported(self) -> None:
        if self.n != 1:
            raise Unsupported("n", f"n = {self.n}: this server returns one choice per request; send n = 1")

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        return False, 0

    def sampling_params(self, max_tokens: int, stop_token_ids: list[int]) -> SamplingParams:
        """The engine's settings for this request, generating at most `max_tokens` (already capped to the context)."""
        logprobs, top = self.logprob_settings()
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=None if self.top_p == 1.0 else self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop=list(self.stop),
            stop_token_ids=[] if self.ignore_eos else list(stop_token_ids),
            seed=self.seed, logprobs=logprobs, top_logprobs=top, ignore_eos=self.ignore_eos,
        )  # fmt: skip


class CompletionRequest(_Sampling):
    """POST /v1/completions: `prompt` is a string (encoded after the document-start token) or a list of token ids."""

    prompt: Union[str, list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, unsupported in (("echo", self.echo), ("best_of", (self.best_of or 1) > 1), ("suffix", self.suffix)):
            if unsupported:
                raise Unsupported(name, f"{name} is not supported by this server; leave it out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise Unsupported("prompt", "prompt is an empty list of token ids")

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: the messages go through the model's chat template. `rag` is lmforge's extension
    (answer from the index the server was started with, `--docs`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    rag: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise Unsupported("tools", "tools (function calling) are not supported by this server; leave them out")
        if self.top_logprobs and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs: true")

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs or 0


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's default)

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or any(not t for t in texts):
            raise ValueError("input must be a non-empty string or a non-empty list of non-empty strings")
        return texts
