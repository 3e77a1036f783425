"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

OpenAI clients pick their exception class from the status code and show `message`, so every
error, FastAPI's own included, leaves in this shape with the status OpenAI would use: a bad body
is a 400 (FastAPI's default is 422), an unknown model a 404, a full queue a 429.

A 5xx says only that something failed and under which request id: what failed (a worker's
traceback, its pid and address) is for the server log, not for whoever sent the request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tetris.runtime.engine_api import QueueFull, RequestRejected
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server import request_ids

log = logging.getLogger(__name__)
INVALID = "invalid_request_error"
# A queue slot frees whenever any request is planned or finishes, usually within a second at
# load; OpenAI's clients wait this long (they honour Retry-After up to 60 s) before retrying.
RETRY_AFTER_S = 1
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}


class ErrorResponse(JSONResponse):
    """ASCII JSON: a message that quotes the client's input must not fail to encode (a lone
    surrogate has no UTF-8 form), turning a 4xx into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """Raised by a route to answer with an error JSON."""

    def __init__(self, status: int, message: str, *, kind: str = INVALID,
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind=kind, param=param, code=code)
        self.headers = dict(headers or {})


def error_body(message: str, *, kind: str = INVALID, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_not_found(name: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist; this server serves '{served}'.",
                    param="model", code="model_not_found")


def not_serving() -> ApiError:
    return ApiError(503, "The engine is not serving (starting up or shutting down); retry later.",
                    kind="service_unavailable_error", code="engine_not_serving",
                    headers=RETRY_HEADERS)


def queue_full(message: str = "") -> ApiError:
    return ApiError(429, message or "The server's request queue is full; retry later.",
                    kind="rate_limit_error", code="queue_full", headers=RETRY_HEADERS)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is over this server's limit of {limit} bytes.",
                    code="body_too_large")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body sent without Content-Length passes the limit. An
    HTTPException, because FastAPI re-raises those from its body reading (anything else there
    becomes a 400), so the handler below answers it."""

    def __init__(self, limit: int) -> None:
        self.error = body_too_large(limit)
        super().__init__(413, str(self.error))


def deadline_error(exc: Exception) -> dict[str, Any]:
    """The engine's own message (it names the limit, nothing internal)."""
    return error_body(str(exc), kind="timeout_error", code="deadline_exceeded")


def internal_error(request_id: str) -> dict[str, Any]:
    return error_body(f"Internal error (request id {request_id}); see the server log.",
                      kind="server_error", code="internal_error")


def param_name(loc: Sequence[int | str]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_message(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] == "json_invalid":
        return f"The body is not valid JSON: {ctx.get('error', err['msg'])}."
    if err["type"] == "value_error" and "error" in ctx:
        return str(ctx["error"])  # without pydantic's "Value error, " prefix
    return str(err["msg"])


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    if not errors:
        return ApiError(400, "Invalid request.")
    first = errors[0]
    message = _validation_message(first)
    param = None if first["type"] == "json_invalid" else param_name(first["loc"])
    if param is None and first["type"] != "json_invalid":
        message = f"The body must be a JSON object, sent as application/json: {message}"
    elif param is not None:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param)


def _http_error(exc: HTTPException) -> ApiError:
    # Unknown paths, wrong methods, unparsable bodies: in the same shape as everything else.
    kind = INVALID if exc.status_code < 500 else "server_error"
    return ApiError(exc.status_code, str(exc.detail), kind=kind, headers=exc.headers)


def install_error_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    def respond(error: ApiError, reason: str) -> ErrorResponse:
        metrics.request_rejected(error.body["error"]["code"] or reason)
        return ErrorResponse(error.body, status_code=error.status, headers=error.headers)

    async def on_validation(_: Request, exc: Exception) -> ErrorResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(validation_error(exc), "invalid_request")

    async def on_api_error(_: Request, exc: Exception) -> ErrorResponse:
        assert isinstance(exc, ApiError)
        return respond(exc, "invalid_request")

    async def on_queue_full(_: Request, exc: Exception) -> ErrorResponse:
        return respond(queue_full(str(exc)), "queue_full")

    async def on_rejected(_: Request, exc: Exception) -> ErrorResponse:
        assert isinstance(exc, RequestRejected)
        return respond(ApiError(400, str(exc), param=exc.param), "rejected_by_engine")

    async def on_http(_: Request, exc: Exception) -> ErrorResponse:
        assert isinstance(exc, HTTPException)
        error = exc.error if isinstance(exc, BodyTooLarge) else _http_error(exc)
        return respond(error, f"http_{exc.status_code}")

    async def on_unexpected(request: Request, exc: Exception) -> ErrorResponse:
        # Only what escapes the HTTP boundary middleware lands here; Starlette re-raises after
        # answering, so the server logs the traceback too.
        rid = request_ids.of(request.scope)
        log.error("request %s failed: %s: %s", rid, type(exc).__name__, exc)
        metrics.request_rejected("internal_error")
        return ErrorResponse(internal_error(rid), status_code=500,
                             headers={request_ids.HEADER: rid})

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(RequestRejected, on_rejected)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
