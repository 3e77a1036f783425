"""What operators see of the HTTP layer: /health with its counts, request ids, 5xx bodies that
leak nothing, responses counted by status, and Retry-After on 429s."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fake_engine import MAX_TOKEN_CHARS, FakeEngine
from tests.test_server_app import CHAT, assert_error, chat, complete, events
from tests.test_server_metrics import sample
from tetris.runtime.engine_api import DeadlineExceeded, EngineHealth
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server.app import create_app

# What a worker's failure text looks like once the engine wraps it in a user-facing message.
WORKER_FAILURE = ("prefill of 'cmpl-1' failed: Traceback (most recent call last):\n"
                  '  File "/opt/tetris/runtime/worker.py", line 88, in run_chunk\n'
                  "RuntimeError: NCCL timeout (pid 4242, 10.1.2.3:29500)")
LEAKS = ("Traceback (most recent call last)", "/opt/tetris/runtime/worker.py", "4242",
         "10.1.2.3", "NCCL")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(ServingMetrics())


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    # raise_server_exceptions off: the test sees the 500 a real client would.
    app = create_app(engine, engine.metrics, max_token_chars=MAX_TOKEN_CHARS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def metric(engine: FakeEngine, name: str, labels: str) -> float:
    return sample(engine.metrics.render()[0].decode(), name, labels)


# -- /health -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "code"), [("ok", 200), ("degraded", 200),
                                              ("unavailable", 503)])
def test_health_reports_the_engines_counts(client: TestClient, engine: FakeEngine, status: str,
                                           code: int) -> None:
    """/health is the engine's health JSON, 200 for ok and degraded, 503 for unavailable."""
    engine.engine_health = EngineHealth(status, 3, 4, 1, 2, instances_lost=2,  # type: ignore[arg-type]
                                        requests_recovered=5)
    response = client.get("/health")
    assert response.status_code == code
    assert response.json() == {"status": status, "prefill_live": 3, "prefill_total": 4,
                               "decode_live": 1, "decode_total": 2, "instances_lost": 2,
                               "requests_recovered": 5}


def test_health_is_503_while_not_serving(client: TestClient, engine: FakeEngine) -> None:
    """An engine that is not serving is "unavailable" (503), whatever its instance counts."""
    engine.is_serving = False
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable" and response.json()["prefill_live"] == 2


# -- request ids and 5xx bodies ----------------------------------------------------------------
def test_every_response_carries_a_fresh_request_id(client: TestClient) -> None:
    """200s, 4xx and streams all carry an X-Request-Id, a new one each time."""
    responses = [complete(client, prompt="hi"), complete(client, prompt="hi", n=2),
                 client.get("/nowhere"), client.get("/health"), client.put("/health"),
                 complete(client, prompt="hi", stream=True), client.get("/metrics")]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(i.startswith("req-") for i in ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_failure_text_stays_in_the_log(client: TestClient, engine: FakeEngine,
                                              caplog: pytest.LogCaptureFixture,
                                              stream: bool) -> None:
    """A failing stream's traceback, paths and pids reach the log, not the client's body."""
    engine.fail_after = 1
    engine.failure = RuntimeError(WORKER_FAILURE)
    with caplog.at_level(logging.ERROR):
        response = complete(client, prompt="hello", stream=stream)
    rid = response.headers["x-request-id"]
    if stream:
        error = events(response)[-1]["error"]
    else:
        assert_error(response, 500, code="internal_error")
        error = response.json()["error"]
    assert error["type"] == "server_error" and rid in error["message"]
    assert not any(leak in response.text for leak in LEAKS), response.text
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert rid in logged and "NCCL timeout" in logged


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_is_a_504_naming_the_limit(
        client: TestClient, engine: FakeEngine, stream: bool) -> None:
    """The engine's DeadlineExceeded: 504 (or an in-band error event after the streamed
    tokens) with its message, which names the limit."""
    engine.fail_after = 2
    engine.failure = DeadlineExceeded("the request ran past the server's deadline of 5 s")
    response = complete(client, prompt="hello", stream=stream)
    if stream:
        assert response.status_code == 200
        error = events(response)[-1]["error"]
    else:
        assert_error(response, 504, code="deadline_exceeded")
        error = response.json()["error"]
    assert "deadline of 5 s" in error["message"] and error["type"] == "timeout_error"


def test_unexpected_exception_is_a_short_500(client: TestClient, engine: FakeEngine,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Any exception a route did not expect: a 500 naming the request id, the details logged."""

    def broken(*_: Any) -> Any:
        raise OSError(WORKER_FAILURE)

    engine.live_plan = broken  # type: ignore[method-assign]
    engine.submit = broken  # type: ignore[assignment,method-assign]
    with caplog.at_level(logging.ERROR):
        for response in (client.get("/v1/tetris/plan"), chat(client, messages=CHAT)):
            rid = response.headers["x-request-id"]
            assert rid in assert_error(response, 500, code="internal_error")
            assert not any(leak in response.text for leak in LEAKS), response.text
            assert any(rid in r.getMessage() and "NCCL" in (r.exc_text or "")
                       for r in caplog.records)


# -- metrics and Retry-After -------------------------------------------------------------------
def test_responses_are_counted_by_status(client: TestClient, engine: FakeEngine) -> None:
    """http_responses_total counts each status; request_rejected_total counts each reason."""
    complete(client, prompt="hi")
    complete(client, prompt="hi", stream=True)
    complete(client, prompt="hi", n=2)
    complete(client, model="gpt-17", prompt="hi")
    client.get("/nowhere")
    engine.queue_full = True
    complete(client, prompt="hi")
    assert metric(engine, "tetris:http_responses_total", 'code="200"') == 2
    assert metric(engine, "tetris:http_responses_total", 'code="400"') == 1
    assert metric(engine, "tetris:http_responses_total", 'code="404"') == 2
    assert metric(engine, "tetris:http_responses_total", 'code="429"') == 1
    assert metric(engine, "tetris:request_rejected_total", 'reason="queue_full"') == 1
    assert metric(engine, "tetris:request_rejected_total", 'reason="model_not_found"') == 1
    assert metric(engine, "tetris:request_rejected_total", 'reason="invalid_request"') == 1


def test_queue_full_says_when_to_retry(client: TestClient, engine: FakeEngine) -> None:
    """A 429, from the engine's QueueFull or from the app's own count, has Retry-After: 1."""
    engine.queue_full = True  # the engine refuses at submit
    by_engine = chat(client, messages=CHAT)
    engine.queue_full, engine.max_queue = False, 0  # the app sees no room before tokenizing
    by_app = complete(client, prompt="hi")
    for response in (by_engine, by_app):
        assert_error(response, 429, code="queue_full")
        assert response.headers["retry-after"] == "1"
    assert engine.encoded == ["user: abc"]  # the second was never tokenized
    engine.max_queue = 8
    assert complete(client, prompt="hi").status_code == 200


def test_not_serving_says_when_to_retry(client: TestClient, engine: FakeEngine) -> None:
    """A 503 for generation while the engine is not serving has Retry-After too."""
    engine.is_serving = False
    response = complete(client, prompt="hi")
    assert_error(response, 503, code="engine_not_serving")
    assert response.headers["retry-after"] == "1"
