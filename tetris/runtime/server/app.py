"""The OpenAI-compatible HTTP API in front of an `EngineAPI`.

`create_app(engine, metrics)` holds no state of its own beyond what it is given, so tests drive
it with a stand-in engine and every app has its own metrics registry.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tetris import __version__
from tetris.runtime.engine_api import EngineAPI, GenerationRequest
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.server.errors import (
    ApiError,
    install_error_handlers,
    model_not_found,
    not_serving,
    server_error,
)
from tetris.runtime.server.protocol import (
    ApiFinish,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    TetrisInfo,
    Usage,
)
from tetris.runtime.server.streaming import (
    EventStreamResponse,
    Format,
    Relay,
    collect_or_cancel,
    sse_events,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def create_app(engine: EngineAPI, metrics: ServingMetrics) -> FastAPI:
    app = FastAPI(title="Tetris", version=__version__)
    install_error_handlers(app)
    started = int(time.time())

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.serving:
            raise not_serving()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": engine.model_name, "object": "model", "created": started,
                "owned_by": "tetris", "max_model_len": engine.context_tokens}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/tetris/plan")
    async def live_plan() -> JSONResponse:
        return JSONResponse(engine.live_plan())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        prompt = cast(str | list[int], body.prompt)  # the validator unwrapped one-prompt lists
        if isinstance(prompt, str):
            prompt_ids = await encode(engine.encode, prompt, "prompt")
        else:
            prompt_ids = prompt
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_name)
        return await generate(engine, request, fmt, prompt_ids, sampling(body, max_tokens),
                              body.stream, body.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        prompt_ids = await encode(engine.encode_chat, body.engine_messages(), "messages")
        max_tokens = body.max_new_tokens
        if max_tokens is None:
            # OpenAI's chat default is what the context leaves; the engine caps it.
            left = engine.context_tokens - len(prompt_ids)
            max_tokens = min(left, engine.default_max_tokens)
            if left <= 0:
                raise ApiError(400, f"The messages take {len(prompt_ids)} tokens, the whole "
                               f"context of {engine.context_tokens} tokens.", param="messages")
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_name)
        return await generate(engine, request, fmt, prompt_ids, sampling(body, max_tokens),
                              body.stream, body.include_usage)

    return app


def check_model(engine: EngineAPI, model: str) -> None:
    if model != engine.model_name:
        raise model_not_found(model, engine.model_name)
    if not engine.serving:
        raise not_serving()


async def encode(func: Callable[[T], list[int]], value: T, param: str) -> list[int]:
    # In a worker thread: tokenizing a 128k-token prompt must not stall every other stream.
    try:
        ids = await anyio.to_thread.run_sync(func, value)
    except ValueError as exc:
        raise ApiError(400, f"Cannot tokenize the {param}: {exc}", param=param) from None
    if not ids:
        raise ApiError(400, f"The {param} encode to no tokens.", param=param)
    return ids


def sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          max_tokens=max_tokens, stop=body.stop_strings)


async def generate(engine: EngineAPI, request: Request, fmt: CompletionFormat | ChatFormat,
                   prompt_ids: list[int], params: SamplingParams, stream: bool,
                   include_usage: bool) -> Response:
    # QueueFull and RequestRejected propagate to their handlers (429, 400).
    submitted = await engine.submit(GenerationRequest(fmt.id, prompt_ids, params))
    relay = Relay(submitted)
    if stream:
        return EventStreamResponse(relay, sse_events(relay, fmt, include_usage))
    try:
        if not await collect_or_cancel(request, relay):
            # Nobody is left to read it; the status is for the access log.
            return Response(status_code=499)
    except Exception as exc:
        log.exception("engine stream of %s failed", fmt.id)
        return JSONResponse(server_error(f"The engine failed while generating: {exc}"),
                            status_code=500)
    return JSONResponse(fmt.whole("".join(relay.text), relay.finish, relay.usage(), relay.info()))


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
