"""The OpenAI response bodies we return, whole and as stream chunks, plus Tetris's own summary of
how each request was served. Strict in the other direction: no field we did not define."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

_RESPONSE = ConfigDict(extra="forbid")
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
