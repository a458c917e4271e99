"""The OpenAI wire format: request models, response/chunk builders, and OpenAI-shaped errors.

Only what coolray serves is modelled (completions, chat completions, models). Fields clients commonly send but
that do not change the answer are accepted and ignored; fields that would change the answer in a way we do not
implement (`n > 1`, `logprobs`, tools, `echo`, `logit_bias`, presence/frequency penalties, a JSON
`response_format`, `best_of > 1`) are refused with a 400 instead of being silently dropped. Their no-op values
(`n: 1`, penalties 0, `logit_bias: {}`, `response_format: {"type": "text"}`), which some clients always send, are
accepted.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
# What torch.Generator.manual_seed accepts (the HF engine seeds each row's generator with it): a larger seed would
# fail the whole batch in the engine, i.e. a 500 for every request batched with it.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, **kw: Any) -> dict:
    return OpenAIError(status, message, **kw).body()


def from_validation_error(err: ValidationError) -> OpenAIError:
    """The first pydantic problem as a 400 naming the offending field (`messages.0.role`, `max_tokens`, ...)."""
    first = err.errors()[0]
    # Unions add the tried member type to the location ("prompt.str", "stop.list[str]"): keep field names only.
    fields = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    param = ".".join(fields) or None
    got = first.get("input")
    got_text = f" (got {json.dumps(got, default=str)[:80]})" if first["type"] != "missing" else ""
    return OpenAIError(400, f"{param or 'body'}: {first['msg']}{got_text}", param=param, code="invalid_value")


class _Strict(BaseModel):
    # Unknown fields are ignored like OpenAI's SDKs expect; wrong types of known fields are errors.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None  # None = the one served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> OpenAIError | None:
        if self.n != 1:
            return OpenAIError(400, "only n=1 is supported; send several requests instead", param="n",
                               code="unsupported_value")
        if self.logprobs not in (None, False, 0):
            return OpenAIError(400, "logprobs are not supported by this server", param="logprobs",
                               code="unsupported_value")
        if self.top_logprobs:
            return OpenAIError(400, "top_logprobs needs logprobs, which this server does not support",
                               param="top_logprobs", code="unsupported_value")
        if self.logit_bias:
            return OpenAIError(400, "logit_bias is not supported by this server", param="logit_bias",
                               code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return OpenAIError(400, f"{name} is not supported by this server (only 0)", param=name,
                                   code="unsupported_value")
        return None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("a list of several prompts is not supported; send one prompt per request")
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    def unsupported(self) -> OpenAIError | None:
        if self.echo:
            return OpenAIError(400, "echo is not supported", param="echo", code="unsupported_value")
        if self.suffix:
            return OpenAIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_value")
        if self.best_of not in (None, 1):
            return OpenAIError(400, "only best_of=1 is supported; send several requests and rank them yourself",
                               param="best_of", code="unsupported_value")
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # InternLM2's ChatML roles, plus OpenAI's newer name for the system role ("developer"), read as "system".
    role: Literal["system", "developer", "user", "assistant", "environment"]
    content: str | list[TextPart]

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> OpenAIError | None:
        if self.tools:
            return OpenAIError(400, "tools / function calling are not supported", param="tools",
                               code="unsupported_value")
        if self.response_format and self.response_format.get("type", "text") != "text":
            return OpenAIError(400, f"response_format {self.response_format.get('type')!r} is not supported (only "
                                    "'text'): this server does not constrain decoding", param="response_format",
                               code="unsupported_value")
        return super().unsupported()


# ------------------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(payload: dict | str) -> str:
    """One server-sent event; the stream ends with the literal `data: [DONE]`."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def model_card(model: str, created: int, max_model_len: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "coolray", "max_model_len": max_model_len}


def models_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [model_card(model, created, max_model_len)]}
