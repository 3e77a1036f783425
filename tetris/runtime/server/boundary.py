"""The ASGI layer every HTTP request passes first: its id, its body limit, its count, and the
last word on a failure nothing else handled.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses and
wrap exceptions in groups. It sits inside Starlette's ServerErrorMiddleware, so an unexpected
exception reaches it before the default handler, which would answer around it (without the
request id header and uncounted).
"""

from __future__ import annotations

import logging

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server import request_ids
from tetris.runtime.server.errors import (
    ApiError,
    BodyTooLarge,
    ErrorResponse,
    body_too_large,
    internal_error,
)

log = logging.getLogger(__name__)
# Enough for a 128k-token context written out in any tokenizer's worst case (a few bytes a
# character, JSON escapes included) with room to spare; a body past it is refused unread.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# How much of a refused body is read (and dropped) so that the client can read the answer.
DISCARD_BYTES = 64 * 1024 * 1024
DISCARD_S = 2.0


class HttpBoundary:
    def __init__(self, app: ASGIApp, *, metrics: ServingMetrics,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_ids.assign(scope)
        started = False

        async def send_tagged(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[request_ids.HEADER] = rid
                self.metrics.http_response(int(message["status"]))
            await send(message)

        async def refuse(error: ApiError) -> None:
            self.metrics.request_rejected(error.body["error"]["code"] or "invalid_request")
            response = ErrorResponse(error.body, status_code=error.status, headers=error.headers)
            await response(scope, receive, send_tagged)

        if _declared_length(scope) > self.max_body_bytes:
            # Refused before anything is kept. The body is read and dropped first (bounded),
            # since a client still writing it (urllib, most simple ones) would otherwise see a
            # broken pipe instead of the answer.
            await _discard_body(receive)
            await refuse(body_too_large(self.max_body_bytes))
            return
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        try:
            await self.app(scope, receive_counted, send_tagged)
        except BodyTooLarge:
            if started:
                raise
            await refuse(body_too_large(self.max_body_bytes))
        except Exception:
            # The traceback and the exception's text (a worker's pid, paths, addresses) go to
            # the log only; the client gets the id that finds them there.
            log.exception("request %s (%s %s) failed", rid, scope.get("method"),
                          scope.get("path"))
            if started:
                raise  # the response is under way: the server must cut the connection
            self.metrics.request_rejected("internal_error")
            response = ErrorResponse(internal_error(rid), status_code=500)
            await response(scope, receive, send_tagged)


async def _discard_body(receive: Receive) -> None:
    """Read the request's body and drop it, for at most DISCARD_BYTES or DISCARD_S."""
    seen = 0
    with anyio.move_on_after(DISCARD_S):
        while seen < DISCARD_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _declared_length(scope: Scope) -> int:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0  # the server refuses a malformed length before the app runs
