"""A bounded property-based fuzz of the HTTP API (schemathesis): requests drawn from the app's
own /openapi.json, valid and invalid, against the fake engine; every response must be a non-5xx
that the same document describes (status, content type, headers, body)."""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fake_engine import MAX_TOKEN_CHARS, FakeEngine
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server.app import create_app

ENGINE = FakeEngine(ServingMetrics())
APP = create_app(ENGINE, ENGINE.metrics, max_token_chars=MAX_TOKEN_CHARS)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]


@SCHEMA.parametrize()
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_api_conforms_to_its_schema(case: Case) -> None:
    """Each operation: no 5xx, and status, media type, headers and body as documented."""
    case.call_and_validate(checks=CHECKS)


def _media(response: dict[str, Any]) -> dict[str, Any]:
    return {media: body.get("schema") for media, body in response["content"].items()}


def test_document_says_what_the_app_does() -> None:
    """No 422s; errors as 400-504 in the error shape; SSE, text/plain /metrics, /health 503."""
    doc = APP.openapi()
    error = {"$ref": "#/components/schemas/ErrorResponseBody"}
    assert "422" not in json.dumps(doc) and "HTTPValidationError" not in json.dumps(doc)
    for path, body in (("/v1/completions", "CompletionRequest"),
                       ("/v1/chat/completions", "ChatCompletionRequest")):
        responses = doc["paths"][path]["post"]["responses"]
        assert sorted(responses) == ["200", "400", "404", "413", "429", "500", "503", "504"]
        assert all(_media(responses[code]) == {"application/json": error}
                   for code in responses if code != "200")
        assert set(_media(responses["200"])) == {"application/json", "text/event-stream"}
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
        model = doc["components"]["schemas"][body]["properties"]["model"]
        assert model["enum"] == [ENGINE.model_name]
    assert set(_media(doc["paths"]["/metrics"]["get"]["responses"]["200"])) == {"text/plain"}
    health = doc["paths"]["/health"]["get"]["responses"]
    assert _media(health["200"]) == _media(health["503"]) == {
        "application/json": {"$ref": "#/components/schemas/HealthBody"}}
    assert all("X-Request-Id" in response["headers"] for operations in doc["paths"].values()
               for operation in operations.values()
               for response in operation["responses"].values())


def test_served_document_is_the_fixed_one() -> None:
    """GET /openapi.json serves the same fixed document, the one schemathesis reads."""
    with TestClient(APP) as client:
        assert client.get("/openapi.json").json() == json.loads(json.dumps(APP.openapi()))
