"""The OpenAI wire format we accept and return: pydantic at the HTTP boundary only.

Requests are strict (a known field of the wrong type is a 400, never coerced) and ignore fields
they do not know, because OpenAI clients send many. Fields we know but do not implement are
accepted only at their neutral value (`n: 1`, `frequency_penalty: 0`, `logprobs: null`, ...);
anything else is a 400 naming the field, so no option is dropped silently.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

_REQUEST = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
_RESPONSE = ConfigDict(extra="forbid")

# Known but unimplemented options and the values at which they change nothing.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "best_of": (None, 1),
    "echo": (False,),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


def _one_of(what: str) -> WrapValidator:
    """Pydantic reports a failed union once per member; clients need one line naming the field."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("type_error", "must be {what}", {"what": what}) from None

    return WrapValidator(check)


TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = Annotated[
    str | TokenIds | list[str] | list[TokenIds],
    _one_of("a string, a list of token ids, or a list holding exactly one of those"),
]
Stop = Annotated[str | list[str] | None, _one_of("a string or a list of strings")]


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Sampling defaults are OpenAI's (temperature 1)."""

    model_config = _REQUEST

    model: str
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch's generator range
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = 1
    logprobs: bool | int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator(*NEUTRAL, check_fields=False)  # also the endpoints' own fields
    @classmethod
    def _neutral(cls, value: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        allowed = NEUTRAL[info.field_name]
        # Type-aware: `logprobs: 0` asks for the sampled token's logprob, `false` does not.
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool)
                   for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise ValueError(f"not supported: only {shown} is accepted")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        # An empty stop string would match before the first token.
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, gt=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
            value = value[0]
        if len(value) == 0:
            raise ValueError("the prompt is empty")
        return value  # type: ignore[no-any-return]


class TextPart(BaseModel):
    model_config = _REQUEST

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _REQUEST

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], _one_of("a string or a list of text parts")]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _some_text(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text for m in value):
            raise ValueError("every message is empty: there is nothing to answer")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        """`max_completion_tokens` replaced `max_tokens` in OpenAI's API; either may be sent."""
        return self.max_completion_tokens or self.max_tokens

    def engine_messages(self) -> list[dict[str, str]]:
        # Chat templates generally know only system/user/assistant.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in self.messages]


# -- responses ---------------------------------------------------------------------------------
ApiFinish = Literal["stop", "length"]


def _omit_none(value: object) -> bool:
    return value is None


class Usage(BaseModel):
    model_config = _RESPONSE

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TetrisChunk(BaseModel):
    model_config = _RESPONSE

    start_token: int
    end_token: int
    instances: list[int]
    seconds: float


class TetrisInfo(BaseModel):
    """Non-standard: how Tetris served the request (its prefill chunks, its decode instances)."""

    model_config = _RESPONSE

    chunks: list[TetrisChunk]
    decode_instances: list[int]
    token_ids: list[int] = Field(default_factory=list)  # the output tokens, EOS included


Tetris = Annotated[TetrisInfo | None, Field(exclude_if=_omit_none)]


class _Response(BaseModel):
    model_config = _RESPONSE

    id: str
    object: str
    created: int
    model: str


class CompletionChoice(BaseModel):
    model_config = _RESPONSE

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: ApiFinish | None


class CompletionResponse(_Response):
    """Also the stream chunk: OpenAI streams completions as `text_completion` objects."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    tetris: Tetris = None


class AssistantMessage(BaseModel):
    model_config = _RESPONSE

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    model_config = _RESPONSE

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: ApiFinish


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    tetris: Tetris = None


class ChatDelta(BaseModel):
    model_config = _RESPONSE

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)


class ChatChunkChoice(BaseModel):
    model_config = _RESPONSE

    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: ApiFinish | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    tetris: Tetris = None
