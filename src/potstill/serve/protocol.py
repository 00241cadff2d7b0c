"""OpenAI HTTP API request models (pydantic) and the OpenAI-style error type.

Ranges follow OpenAI's, with one widening: completions ``logprobs`` accepts 0..20 (OpenAI:
0..5), the same cap as chat ``top_logprobs``. Unknown fields are ignored, as OpenAI's
clients send some we do not use (``user``, ``metadata``...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_N",
    "MAX_STOPS",
    "MAX_TOP_LOGPROBS",
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "error_body",
]

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4  # as OpenAI


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's body
    ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


def _stops(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty")
    return stops


class _Sampling(_Request):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # vLLM's extension: no end of sequence before this many tokens (at most max_tokens)
    min_tokens: int | None = Field(default=None, ge=0)
    # Accepted (clients send ``{}``) and typed, so API policy sees the parsed value; the
    # server never applies it (logit_bias probing recovers hidden logits).
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        _stops(v)
        return v

    def stop_list(self) -> list[str]:
        return _stops(self.stop)


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: a string, a list of strings (one result set of
    ``n`` choices each), a token list, or a list of token lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    # vLLM's extension: name logprob tokens "token_id:N", so a client maps them to ids exactly
    # (two ids can print the same string). Distillation against an endpoint needs it.
    return_tokens_as_token_ids: bool | None = False

    def top_logprobs_asked(self) -> int | None:
        """Top-k logprobs this request would be served per token (None: no logprobs)."""
        return self.logprobs


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message text; content parts of type "text" are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. ``max_completion_tokens`` wins over ``max_tokens``;
    with neither, generation may use the rest of the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_asked(self) -> int | None:
        """Top-k logprobs this request would be served per token (None: no logprobs);
        ``top_logprobs`` without ``logprobs=true`` returns nothing."""
        return (self.top_logprobs or 0) if self.logprobs else None
