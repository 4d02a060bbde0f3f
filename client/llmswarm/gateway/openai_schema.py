"""The OpenAI request and response bodies the gateway speaks, as strict pydantic models.

Requests are validated the way OpenAI validates them: types are strict (``"5"`` is not a
number), unknown arguments are refused ("Unrecognized request argument supplied"), and
values out of range name the offending parameter. Parameters of the OpenAI API that the
swarm cannot honour (tools, logprobs, several choices...) are accepted only at their
neutral value, and refused with a clear message otherwise, rather than silently ignored.
Parameters that change nothing about the answer (``user``, ``metadata``, ``store``...)
are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from llmswarm.gateway.errors import ApiError, bad_request

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1

RequestT = TypeVar("RequestT", bound=BaseModel)


class ParamError(ValueError):
    """A refusal from a whole-request check, naming the parameter it is about."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content parts of type '{kind}' are not supported, only 'text'")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        """The message as a chat template takes it (`developer` is OpenAI's newer name for `system`)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of stream chunks; nothing to obfuscate here


class _Sampling(_Strict):
    """What chat completions and completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored: answers do not depend on them
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for stop in stops:
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdecimal()):  # "²" passes isdigit() and then fails int()
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias for token {key} must be between -100 and 100, got {bias}")
        return value

    @model_validator(mode="after")
    def _one_choice(self) -> _Sampling:
        if self.n not in (None, 1):
            raise ParamError("n", "Only n=1 is supported.")
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true.")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _neutral(name: str, value: Any, neutral: tuple[Any, ...]) -> None:
    if value not in neutral:
        raise ParamError(name, f"'{name}' is not supported by the llmswarm gateway.")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Parts of the OpenAI API the swarm cannot honour: refused unless neutral.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        _neutral("tools", self.tools, (None, []))
        _neutral("tool_choice", self.tool_choice, (None, "none"))
        _neutral("functions", self.functions, (None, []))
        _neutral("function_call", self.function_call, (None, "none"))
        _neutral("logprobs", self.logprobs, (None, False))
        _neutral("top_logprobs", self.top_logprobs, (None, 0))
        _neutral("response_format", self.response_format, (None, {"type": "text"}))
        _neutral("modalities", self.modalities, (None, ["text"]))
        _neutral("audio", self.audio, (None,))
        _neutral("prediction", self.prediction, (None,))
        _neutral("web_search_options", self.web_search_options, (None,))
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ParamError("max_completion_tokens", "Give max_tokens or max_completion_tokens, not both.")
        if self.messages[-1].role == "assistant" and self.messages[-1].content is None:
            raise ParamError(f"messages[{len(self.messages) - 1}].content", "The last message has no content.")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        _neutral("suffix", self.suffix, (None, ""))
        _neutral("best_of", self.best_of, (None, 1))
        _neutral("logprobs", self.logprobs, (None,))
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ParamError("prompt", "The prompt is empty.")
            if isinstance(self.prompt[0], (str, list)) and len(self.prompt) != 1:
                raise ParamError("prompt", "Only one prompt per request is supported.")
            if isinstance(self.prompt[0], list) and not self.prompt[0]:
                raise ParamError("prompt", "The prompt is empty.")
        return self

    def prompt_text_or_ids(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, list):
            return list(first)
        return [int(token) for token in prompt]  # type: ignore[arg-type]


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body; any defect is a 400 naming the parameter, as OpenAI words it."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise _as_api_error(error) from None


def _param(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as OpenAI names parameters (`messages[0].content`), without union tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict") or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def _as_api_error(error: ValidationError) -> ApiError:
    errors = error.errors()
    # like OpenAI: an unknown argument is reported before a missing one, and both before a bad value
    first = min(errors, key=lambda e: 0 if e["type"] == "extra_forbidden" and len(e["loc"]) == 1 else 1 if e["type"] == "missing" else 2)
    param = _param(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        return bad_request(str(cause), param=cause.param, code="invalid_value")
    message = str(first["msg"]).removeprefix("Value error, ")
    if param:
        return bad_request(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")
    return bad_request(message, code="invalid_value")


# ---- responses ------------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class _Response(BaseModel):
    """A response body; the fields named in `_omit_if_none` are left out rather than sent as null (as OpenAI does)."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"llmswarm", "system_fingerprint"})

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self._omit_if_none}


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class Hop(_Response):
    """One server of the chain that answered: its id and the blocks [start, end) it ran."""

    server: str
    start: int
    end: int


class SwarmInfo(_Response):
    """llmswarm's addition to responses (OpenAI clients keep unknown fields): the chain of servers."""

    chain: list[Hop]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    llmswarm: SwarmInfo | None = None


class ChunkDelta(_Response):
    _omit_if_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Response):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    _omit_if_none = frozenset({"llmswarm", "system_fingerprint", "usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    llmswarm: SwarmInfo | None = None


class CompletionChoice(_Response):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(_Response):
    _omit_if_none = frozenset({"llmswarm", "system_fingerprint", "usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    llmswarm: SwarmInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmswarm"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
