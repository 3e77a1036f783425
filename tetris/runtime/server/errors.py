"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

OpenAI clients pick their exception class from the status code and show `message`, so every
error, FastAPI's own included, leaves in this shape with the status OpenAI would use: a bad body
is a 400 (FastAPI's default is 422), an unknown model a 404, a full queue a 429.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tetris.runtime.engine_api import QueueFull, RequestRejected

INVALID = "invalid_request_error"


class ApiError(Exception):
    """Raised by a route to answer with an error JSON."""

    def __init__(self, status: int, message: str, *, kind: str = INVALID,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind=kind, param=param, code=code)


def error_body(message: str, *, kind: str = INVALID, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_not_found(name: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist; this server serves '{served}'.",
                    param="model", code="model_not_found")


def not_serving() -> ApiError:
    return ApiError(503, "The engine is not serving (starting up or shutting down); retry later.",
                    kind="service_unavailable_error", code="engine_not_serving")


def server_error(message: str) -> dict[str, Any]:
    return error_body(message, kind="server_error", code="internal_error")


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


async def _on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return JSONResponse(error_body("Invalid request."), status_code=400)
    first = errors[0]
    message = _validation_message(first)
    param = None if first["type"] == "json_invalid" else param_name(first["loc"])
    if param is None and first["type"] != "json_invalid":
        message = f"The body must be a JSON object, sent as application/json: {message}"
    elif param is not None:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return JSONResponse(error_body(message, param=param), status_code=400)


async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body, status_code=exc.status)


async def _on_queue_full(_: Request, exc: Exception) -> JSONResponse:
    message = str(exc) or "The server's request queue is full; retry later."
    return JSONResponse(error_body(message, kind="rate_limit_error", code="queue_full"),
                        status_code=429)


async def _on_rejected(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestRejected)
    return JSONResponse(error_body(str(exc), param=exc.param), status_code=400)


async def _on_http(_: Request, exc: Exception) -> JSONResponse:
    # Unknown paths and wrong methods, in the same shape as everything else.
    assert isinstance(exc, HTTPException)
    kind = INVALID if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(exc.detail), kind=kind), status_code=exc.status_code,
                        headers=exc.headers)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Starlette still re-raises after answering, so the server logs the traceback.
    return JSONResponse(server_error(f"Internal error: {type(exc).__name__}: {exc}"),
                        status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(QueueFull, _on_queue_full)
    app.add_exception_handler(RequestRejected, _on_rejected)
    app.add_exception_handler(HTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
