"""Clients that leave mid-request: the engine request is cancelled so its KV is freed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.fake_engine import FakeEngine
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server.app import create_app

MODEL = "fake-model"


@pytest.fixture
def engine() -> FakeEngine:
    """An engine slow enough (20 ms a token) that a 200-token reply is still running."""
    engine = FakeEngine(ServingMetrics())
    engine.token_delay_s = 0.02
    return engine


def test_client_closing_stream_cancels(engine: FakeEngine) -> None:
    """A client that stops reading mid-stream gets its engine request cancelled."""
    body = {"model": MODEL, "prompt": "x" * 200, "stream": True}
    with TestClient(create_app(engine, engine.metrics)) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    assert engine.cancels == [engine.submitted[0].request_id]
    assert engine.streams[0].summary.completion_tokens < 200


async def _asgi_post_then_leave(app: FastAPI, path: str, body: dict[str, Any]) -> list[str]:
    """POST through the raw ASGI interface; the client disconnects 50 ms after sending."""
    sent: list[str] = []
    incoming = [{"type": "http.request", "body": json.dumps(body).encode()}]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels(engine: FakeEngine, stream: bool) -> None:
    """An http.disconnect while the engine generates cancels the request, streamed or not."""
    app = create_app(engine, engine.metrics)
    body = {"model": MODEL, "prompt": "x" * 200, "stream": stream}
    asyncio.run(_asgi_post_then_leave(app, "/v1/completions", body))
    assert engine.cancels == [engine.submitted[0].request_id]
    assert engine.streams[0].summary.completion_tokens < 200
