"""Relaying one engine stream to one HTTP client, as a single JSON body or as SSE.

Whatever ends the exchange early (the client leaving, an engine error, server shutdown), the
engine's `stream.cancel()` runs, so the request's KV and plan are freed rather than left to
generate into a closed socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tetris.runtime.engine_api import (
    DeadlineExceeded,
    FinishReason,
    RequestStream,
    RequestSummary,
)
from tetris.runtime.server.errors import deadline_error, internal_error
from tetris.runtime.server.responses import ApiFinish, TetrisChunk, TetrisInfo, Usage

log = logging.getLogger(__name__)

# The engine's cancel frees GPU memory; a hung one must not pin the connection forever.
CANCEL_TIMEOUT_S = 10.0
# The client sees why its text ended; an engine abort is not one of OpenAI's finish reasons.
API_FINISH: dict[FinishReason, ApiFinish] = {"stop": "stop", "length": "length", "abort": "stop"}


class Format(Protocol):
    """The JSON objects of one endpoint (completions or chat), given the request's text."""

    def opening(self) -> list[dict[str, Any]]: ...

    def piece(self, text: str) -> dict[str, Any]: ...

    def closing(self, finish: ApiFinish, info: TetrisInfo) -> dict[str, Any]: ...

    def usage_chunk(self, usage: Usage) -> dict[str, Any]: ...

    def whole(self, text: str, finish: ApiFinish, usage: Usage, info: TetrisInfo
              ) -> dict[str, Any]: ...


@dataclass
class Relay:
    """One submitted request. `finished`: its last event was read, so there is nothing to free."""

    stream: RequestStream
    finished: bool = False
    text: list[str] = field(default_factory=list)
    finish: ApiFinish = "stop"

    async def release(self) -> None:
        """Cancel the engine request unless it ran to its end. Safe to call more than once."""
        if self.finished:
            return
        self.finished = True
        # Shielded: this runs while the handler is being cancelled because the client left.
        with anyio.move_on_after(CANCEL_TIMEOUT_S, shield=True) as scope:
            await self.stream.cancel()
        if scope.cancelled_caught:
            log.error("engine cancel() did not return within %.0f s", CANCEL_TIMEOUT_S)

    def usage(self) -> Usage:
        s = self.stream.summary
        return Usage(prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                     total_tokens=s.prompt_tokens + s.completion_tokens)

    def info(self) -> TetrisInfo:
        return tetris_info(self.stream.summary)

    async def collect(self) -> None:
        async for event in self.stream:
            self.text.append(event.text)
            if event.finish_reason is not None:
                self.finish = API_FINISH[event.finish_reason]
                self.finished = True
        # An iterator that ends without a finish reason still ended: nothing left to cancel.
        self.finished = True


def tetris_info(summary: RequestSummary) -> TetrisInfo:
    chunks = [TetrisChunk(start_token=c.start_token, end_token=c.end_token,
                          instances=list(c.instances), seconds=c.seconds)
              for c in summary.chunks]
    return TetrisInfo(chunks=chunks, decode_instances=list(summary.decode_instances),
                      token_ids=list(summary.token_ids))


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect_or_cancel(request: Request, relay: Relay) -> bool:
    """Read the whole stream; False if the client left first (the request is then cancelled).
    An engine error is re-raised, after the request is cancelled."""
    done = False
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                nonlocal done, error
                try:
                    await relay.collect()
                    done = True
                except Exception as exc:  # re-raised below, not wrapped in an ExceptionGroup
                    error = exc
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            await _until_disconnected(request.receive)
            tg.cancel_scope.cancel()
    finally:
        await relay.release()
    if error is not None:
        raise error
    return done


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def sse_events(relay: Relay, fmt: Format, include_usage: bool, request_id: str
                     ) -> AsyncGenerator[str, None]:
    """OpenAI's stream: the pieces as they come, a closing chunk (finish reason and the
    `tetris` summary), the usage chunk if asked for, then `[DONE]`. Engine errors become an
    error event: a 200 has already gone out, so the client learns of the failure in-band, as
    the request id that finds the details in the log."""

    def chunk(obj: dict[str, Any]) -> str:
        if not include_usage:
            obj.pop("usage", None)  # OpenAI sends `usage: null` only when usage was asked for
        return sse(obj)

    for obj in fmt.opening():
        yield chunk(obj)
    try:
        async for event in relay.stream:
            if event.text:
                yield chunk(fmt.piece(event.text))
            if event.finish_reason is not None:
                relay.finished = True
                yield chunk(fmt.closing(API_FINISH[event.finish_reason], relay.info()))
        if not relay.finished:  # the iterator ended without a finish reason: it still ended
            relay.finished = True
            yield chunk(fmt.closing("stop", relay.info()))
    except DeadlineExceeded as exc:
        yield sse(deadline_error(exc))
        yield sse("[DONE]")
        return
    except Exception:
        log.exception("engine stream failed (request id %s)", request_id)
        yield sse(internal_error(request_id))
        yield sse("[DONE]")
        return
    if include_usage:
        yield sse(fmt.usage_chunk(relay.usage()))
    yield sse("[DONE]")


class EventStreamResponse(StreamingResponse):
    """SSE that always watches for the client leaving, whatever ASGI version the server speaks
    (Starlette's own stops watching under ASGI 2.4), and cancels the engine request when the
    stream ends early, even if the stream never started."""

    def __init__(self, relay: Relay, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._relay = relay
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def respond() -> None:
                    with contextlib.suppress(OSError):  # the client left as we sent
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(respond)
                await _until_disconnected(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
            await self._relay.release()
