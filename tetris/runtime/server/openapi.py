"""The OpenAPI document the app publishes at /openapi.json, made to say what the app does.

FastAPI's generated document is close but wrong in ways clients and fuzzers notice: it promises
422s (the app answers 400), leaves out the errors the app does send, and lets `model` and the
options pinned to their neutral value take any value. `install_openapi` fixes those, so
schemathesis can hold every response to it (tests/test_server_schema.py).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tetris.runtime.server import request_ids
from tetris.runtime.server.protocol import NEUTRAL


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponseBody(BaseModel):
    error: ErrorDetail


class HealthBody(BaseModel):
    """200 while `status` is "ok" or "degraded" (some instances lost, each role still served),
    503 when "unavailable"; the counts come with either, for monitors."""

    status: Literal["ok", "degraded", "unavailable"]
    prefill_live: int
    prefill_total: int
    decode_live: int
    decode_total: int
    instances_lost: int
    requests_recovered: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


ERRORS: dict[int, str] = {
    400: "The request is malformed or cannot be served as asked; `param` names the field.",
    404: "No such model (`param` is `model`).",
    413: "The body is over the server's limit; it was not read.",
    429: "The request queue is full; retry after `Retry-After` seconds.",
    500: "Internal error; the message names the request id to find in the server log.",
    503: "The engine is not serving (starting up or shutting down); retry later.",
    504: "The request ran past the server's deadline (`request_timeout_s`).",
}
# One event of a stream: `data` is a JSON chunk, an error object, or the final `[DONE]`.
SSE_EVENT: dict[str, Any] = {"type": "object", "required": ["data"],
                             "properties": {"data": {"type": "string"}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponseBody, "description": ERRORS[code]} for code in codes}


def generation(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The responses of a generation route: JSON, or SSE with `"stream": true`."""
    ok = {"model": model, "description": "The whole result, or with `stream` the events.",
          "content": {"text/event-stream": {"schema": SSE_EVENT}}}
    return {200: ok, **errors(400, 404, 413, 429, 500, 503, 504)}


_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponseBody"}


def _is_error(response: dict[str, Any]) -> bool:
    return any(media.get("schema") == _ERROR_REF for media in response.get("content", {}).values())


def install_openapi(app: FastAPI, model_name: str, context_tokens: int) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = _fixed(schema, model_name, context_tokens)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _fixed(schema: dict[str, Any], model_name: str, context_tokens: int) -> dict[str, Any]:
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for body in components.values():
        props = body.get("properties", {})
        if "messages" in props or "prompt" in props:  # a request body
            props["model"] = {"type": "string", "enum": [model_name], "title": "Model",
                              "description": "The served model (see /v1/models)."}
            # FastAPI's OpenAPI models hold bounds as floats, where -2**63 - 1 equals -2**63.
            props["seed"]["anyOf"][0].update(minimum=-(2**63), maximum=2**64 - 1)
            props["seed"]["anyOf"][0].pop("exclusiveMaximum", None)
            for field in ("max_tokens", "max_completion_tokens"):
                if field in props:  # a prompt needs at least one token of the context
                    props[field]["anyOf"][0]["maximum"] = context_tokens - 1
            for field, allowed in NEUTRAL.items():
                if field in props:
                    props[field] = {"enum": list(allowed), "title": props[field].get("title"),
                                    "description": "Not implemented: only its neutral value."}
    id_header = {"description": "The request's id, also in the server's log lines.",
                 "required": True, "schema": {"type": "string"}}
    retry = {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for code, response in responses.items():
                if _is_error(response):
                    # FastAPI files it under the route's media type (text/plain for /metrics).
                    response["content"] = {"application/json": {"schema": _ERROR_REF}}
                headers = response.setdefault("headers", {})
                headers[request_ids.HEADER] = id_header
                if code == "429":
                    headers["Retry-After"] = {**retry, "required": True}
                elif code == "503":
                    headers["Retry-After"] = retry
    return schema
