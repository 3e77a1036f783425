"""The OpenAI-compatible HTTP API in front of an `EngineAPI`.

`create_app(engine, metrics)` holds no state of its own beyond what it is given (and the count
of requests it is tokenizing), so tests drive it with a stand-in engine and every app has its
own metrics registry.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from tetris import __version__
from tetris.runtime.engine_api import (
    DeadlineExceeded,
    EngineAPI,
    GenerationRequest,
    RequestStream,
)
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.server import request_ids
from tetris.runtime.server.boundary import DEFAULT_MAX_BODY_BYTES, HttpBoundary
from tetris.runtime.server.errors import (
    ApiError,
    ErrorResponse,
    deadline_error,
    install_error_handlers,
    internal_error,
    model_not_found,
    not_serving,
)
from tetris.runtime.server.formats import ChatFormat, CompletionFormat
from tetris.runtime.server.intake import Intake
from tetris.runtime.server.openapi import (
    HealthBody,
    ModelList,
    errors,
    generation,
    install_openapi,
)
from tetris.runtime.server.protocol import ChatCompletionRequest, CompletionRequest
from tetris.runtime.server.responses import ChatCompletionResponse, CompletionResponse
from tetris.runtime.server.streaming import (
    EventStreamResponse,
    Relay,
    collect_or_cancel,
    sse_events,
)

log = logging.getLogger(__name__)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def create_app(engine: EngineAPI, metrics: ServingMetrics, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_token_chars: int | None = None) -> FastAPI:
    """`max_body_bytes`: larger bodies are refused (413) unread. `max_token_chars`: the most
    characters one token stands for (`Tokenizer.max_token_chars`), so that text too long for
    the context is refused before tokenizing; None skips that check."""
    app = FastAPI(title="Tetris", version=__version__)
    install_error_handlers(app, metrics)
    app.add_middleware(HttpBoundary, metrics=metrics, max_body_bytes=max_body_bytes)
    install_openapi(app, engine.model_name, engine.context_tokens)
    intake = Intake(engine, max_token_chars)
    started = int(time.time())

    @app.get("/health", response_model=HealthBody, responses={
        503: {"model": HealthBody, "description": "The engine is unavailable."},
        **errors(500)})
    async def health() -> JSONResponse:
        body = dataclasses.asdict(engine.health())
        if not engine.serving:
            body["status"] = "unavailable"
        return JSONResponse(body, status_code=503 if body["status"] == "unavailable" else 200)

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text format 0.0.4."}, **errors(500)})
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v1/models", response_model=ModelList, responses=errors(500))
    async def models() -> JSONResponse:
        card = {"id": engine.model_name, "object": "model", "created": started,
                "owned_by": "tetris", "max_model_len": engine.context_tokens}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/tetris/plan", responses={
        200: {"description": "The live plan, in the `tetris plan --format json` schema.",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        **errors(500)})
    async def live_plan() -> JSONResponse:
        return JSONResponse(engine.live_plan())

    @app.post("/v1/completions", response_model=None,
              responses=generation(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        intake.check_max_tokens(max_tokens, "max_tokens")
        prompt = cast(str | list[int], body.prompt)  # the validator unwrapped one-prompt lists
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_name)
        with intake.slot():
            if isinstance(prompt, str):
                intake.check_length(len(prompt), "prompt")
                prompt_ids = await intake.encode(engine.encode, prompt, "prompt")
            else:
                prompt_ids = prompt
            # QueueFull and RequestRejected propagate to their handlers (429, 400).
            stream = await engine.submit(GenerationRequest(fmt.id, prompt_ids,
                                                           sampling(body, max_tokens)))
        return await respond(request, fmt, stream, body.stream, body.include_usage, metrics)

    @app.post("/v1/chat/completions", response_model=None,
              responses=generation(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        for param, given in (("max_tokens", body.max_tokens),
                             ("max_completion_tokens", body.max_completion_tokens)):
            if given is not None:  # both, when both are sent: each must make sense
                intake.check_max_tokens(given, param)
        max_tokens = body.max_new_tokens
        messages = body.engine_messages()
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_name)
        with intake.slot():
            # The template only adds to the text, so the text alone must fit.
            intake.check_length(sum(len(m["content"]) for m in messages), "messages")
            prompt_ids = await intake.encode(engine.encode_chat, messages, "messages")
            if max_tokens is None:
                # OpenAI's chat default is what the context leaves; the engine caps it.
                left = engine.context_tokens - len(prompt_ids)
                if left <= 0:
                    raise ApiError(400, f"The messages take {len(prompt_ids)} tokens, the "
                                   f"whole context of {engine.context_tokens} tokens.",
                                   param="messages")
                max_tokens = min(left, engine.default_max_tokens)
            stream = await engine.submit(GenerationRequest(fmt.id, prompt_ids,
                                                           sampling(body, max_tokens)))
        return await respond(request, fmt, stream, body.stream, body.include_usage, metrics)

    return app


def check_model(engine: EngineAPI, model: str) -> None:
    if model != engine.model_name:
        raise model_not_found(model, engine.model_name)
    if not engine.serving:
        raise not_serving()


def sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          max_tokens=max_tokens, stop=body.stop_strings)


async def respond(request: Request, fmt: CompletionFormat | ChatFormat, stream: RequestStream,
                  streamed: bool, include_usage: bool, metrics: ServingMetrics) -> Response:
    relay = Relay(stream)
    rid = request_ids.of(request.scope)
    if streamed:
        return EventStreamResponse(relay, sse_events(relay, fmt, include_usage, rid))
    try:
        if not await collect_or_cancel(request, relay):
            # Nobody is left to read it; the status is for the access log.
            return Response(status_code=499)
    except DeadlineExceeded as exc:
        metrics.request_rejected("deadline")
        return ErrorResponse(deadline_error(exc), status_code=504)
    except Exception:
        # Even an engine error meant for users may carry a worker's traceback: log it only.
        log.exception("engine stream of %s failed (request id %s)", fmt.id, rid)
        metrics.request_rejected("engine_error")
        return ErrorResponse(internal_error(rid), status_code=500)
    return JSONResponse(fmt.whole("".join(relay.text), relay.finish, relay.usage(), relay.info()))
