"""The JSON objects of each endpoint, for a whole response or a stream, in OpenAI's format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tetris.runtime.server.responses import (
    ApiFinish,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    TetrisInfo,
    Usage,
)
from tetris.runtime.server.streaming import Format


def _dump(obj: CompletionResponse | ChatCompletionResponse | ChatCompletionChunk
          ) -> dict[str, Any]:
    return obj.model_dump(mode="json")


@dataclass(frozen=True)
class CompletionFormat(Format):
    id: str
    created: int
    model: str

    def _obj(self, choices: list[CompletionChoice], **extra: Any) -> dict[str, Any]:
        return _dump(CompletionResponse(id=self.id, created=self.created, model=self.model,
                                        choices=choices, **extra))

    def opening(self) -> list[dict[str, Any]]:
        return []

    def piece(self, text: str) -> dict[str, Any]:
        return self._obj([CompletionChoice(text=text, finish_reason=None)])

    def closing(self, finish: ApiFinish, info: TetrisInfo) -> dict[str, Any]:
        return self._obj([CompletionChoice(text="", finish_reason=finish)], tetris=info)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._obj([], usage=usage)

    def whole(self, text: str, finish: ApiFinish, usage: Usage, info: TetrisInfo
              ) -> dict[str, Any]:
        return self._obj([CompletionChoice(text=text, finish_reason=finish)], usage=usage,
                         tetris=info)


@dataclass(frozen=True)
class ChatFormat(Format):
    id: str
    created: int
    model: str

    def _chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> dict[str, Any]:
        return _dump(ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                         choices=choices, **extra))

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text))])

    def closing(self, finish: ApiFinish, info: TetrisInfo) -> dict[str, Any]:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish)],
                           tetris=info)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._chunk([], usage=usage)

    def whole(self, text: str, finish: ApiFinish, usage: Usage, info: TetrisInfo
              ) -> dict[str, Any]:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
        return _dump(ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                            choices=[choice], usage=usage, tetris=info))
