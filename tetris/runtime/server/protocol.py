"""The OpenAI request bodies we accept (responses.py has those we return): pydantic at the HTTP
boundary only.

Requests are strict (a known field of the wrong type is a 400, never coerced; only an integral
number such as 5.0 is the integer it equals, since JSON has one number type) and ignore fields
they do not know, because OpenAI clients send many. Fields we know but do not implement are
accepted only at their neutral value (`n: 1`, `frequency_penalty: 0`, `logprobs: null`, ...);
anything else is a 400 naming the field, so no option is dropped silently.

Every string must be encodable text: JSON may spell a lone UTF-16 surrogate (`"\\ud800"`),
which no tokenizer, log line or UTF-8 response can carry. NUL and other control characters are
text like any other (valid UTF-8, escaped in JSON) and pass.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    field_validator,
)
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

_REQUEST = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
# OpenAI's own limits on stop sequences (4), and a bound on each: the engine holds back text
# while it could still become a stop string, so a long one would stall a stream.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
# Far past any context; the app also checks against the engine's own context.
MAX_TOKENS_LIMIT = 2**31 - 1

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


def check_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = f"{ord(value[exc.start]):04X}"
        raise PydanticCustomError(
            "unicode_error", "must be valid Unicode text; it holds a lone surrogate "
            "(U+{code}) at character {at}", {"code": code, "at": exc.start},
        ) from None
    return value


def _integral(value: Any) -> Any:
    # JSON has one number type: 5.0 is the integer 5 (JSON Schema agrees), 5.5 is not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, AfterValidator(check_text)]
# Constraints before the validator, so that they stay in the int schema (and the JSON Schema).
Int = Annotated[int, BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64), BeforeValidator(_integral)]  # torch's range
TokenCount = Annotated[int, Field(gt=0, le=MAX_TOKENS_LIMIT), BeforeValidator(_integral)]
_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_NONEMPTY = {"type": "string", "minLength": 1}
TokenIds = list[Annotated[int, Field(ge=0), BeforeValidator(_integral)]]
Prompt = Annotated[
    str | TokenIds | list[str] | list[TokenIds],
    _one_of("a string, a list of token ids, or a list holding exactly one of those"),
    WithJsonSchema({"anyOf": [
        _NONEMPTY, _IDS_SCHEMA,
        {"type": "array", "items": _NONEMPTY, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": _IDS_SCHEMA, "minItems": 1, "maxItems": 1},
    ]}),
]
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
Stop = Annotated[
    str | list[str] | None,
    _one_of("a string or a list of strings"),
    WithJsonSchema({"anyOf": [_STOP_STRING, {"type": "null"}, {
        "type": "array", "items": _STOP_STRING, "maxItems": MAX_STOP_STRINGS}]}),
]


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Sampling defaults are OpenAI's (temperature 1)."""

    model_config = _REQUEST

    model: Text
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: Seed | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # unused; any length the body limit allows
    n: Int = 1
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
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        for stop in stops:
            check_text(stop)
            # An empty stop string would match before the first token.
            if not stop:
                raise ValueError("stop strings must not be empty")
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, "
                                 f"got {len(stop)}")
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
    max_tokens: TokenCount | None = 16
    echo: bool = False
    best_of: Int | None = None
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
        if isinstance(value, str):
            check_text(value)
        return value  # type: ignore[no-any-return]


class TextPart(BaseModel):
    model_config = _REQUEST

    type: Literal["text"]
    text: str


def _text_content(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Like `_one_of`, but an image (or any other non-text) part is named as such."""
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError(
                    "value_error", "content parts of type {kind} are not supported, only text",
                    {"kind": json.dumps(kind)})
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("type_error", "must be a string or a list of text parts"
                                  ) from None


class ChatMessage(BaseModel):
    model_config = _REQUEST

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], WrapValidator(_text_content)]

    @field_validator("content")
    @classmethod
    def _encodable(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        for text in [value] if isinstance(value, str) else [p.text for p in value]:
            check_text(text)
        return value

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    @property
    def has_text(self) -> bool:
        if isinstance(self.content, str):
            return bool(self.content)
        return any(part.text for part in self.content)


# "Some message has some text", as JSON Schema says it (what `_some_text` checks).
_SOME_TEXT: JsonDict = {
    "type": "object", "required": ["content"], "properties": {"content": {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "contains": {"type": "object", "required": ["text"],
                                       "properties": {"text": {"type": "string", "minLength": 1}}}},
    ]}},
}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra={"contains": _SOME_TEXT})
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    top_logprobs: Int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _some_text(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.has_text for m in value):
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
