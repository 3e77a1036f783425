"""The OpenAI-compatible HTTP layer against a fake engine: results, streams, errors, cancels."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response

from tests.fake_engine import LIVE_PLAN, MAX_TOKEN_CHARS, FakeEngine
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server.app import create_app

MODEL = "fake-model"
CHAT = [{"role": "user", "content": "abc"}]  # the fake's prompt "user: abc" → reply "cba :resu"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(ServingMetrics())


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, engine.metrics, max_token_chars=MAX_TOKEN_CHARS)) as c:
        yield c


def complete(client: TestClient, **body: Any) -> Response:
    return client.post("/v1/completions", json={"model": MODEL, **body})


def chat(client: TestClient, **body: Any) -> Response:
    return client.post("/v1/chat/completions", json={"model": MODEL, **body})


def events(response: Response) -> list[Any]:
    """The SSE payloads, decoded; the stream must end with `[DONE]`."""
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    payloads = [b.removeprefix("data: ") for b in blocks[:-1]]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(response: Response, status: int, param: str | None = None,
                 code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["message"]
    return str(error["message"])


def assert_still_serves(client: TestClient) -> None:
    response = complete(client, prompt="hello")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "olleh"


# -- results -----------------------------------------------------------------------------------
def test_completion(client: TestClient, engine: FakeEngine) -> None:
    """A text completion returns the text, finish reason, usage and the chunk plan it used."""
    body = complete(client, prompt="hello").json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "olleh", "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert body["tetris"] == {
        "chunks": [{"start_token": 0, "end_token": 2, "instances": [0], "seconds": 0.01},
                   {"start_token": 2, "end_token": 5, "instances": [0, 1], "seconds": 0.02}],
        "decode_instances": [2],
        "token_ids": [ord(c) for c in "olleh"],
    }
    assert engine.submitted[0].request_id == body["id"] and engine.cancels == []


def test_sampling_params_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    """temperature, top_p, seed, max_tokens and stop strings become the SamplingParams."""
    response = complete(client, prompt="hello", temperature=0.5, top_p=0.9, seed=7, max_tokens=9,
                        stop=["xy", "le"])
    assert response.json()["choices"][0]["text"] == "ol"  # cut before the stop string
    sampling = engine.submitted[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.5, 0.9, 7)
    assert (sampling.max_tokens, sampling.stop) == (9, ("xy", "le"))
    complete(client, prompt="hello", stop="l")
    assert engine.submitted[1].sampling.stop == ("l",)
    assert engine.submitted[1].sampling.max_tokens == 16  # OpenAI's completions default


def test_max_tokens_finishes_with_length(client: TestClient) -> None:
    """Generation cut by max_tokens reports finish_reason "length"."""
    choice = complete(client, prompt="hello", max_tokens=3).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("oll", "length")


def test_token_id_prompts(client: TestClient, engine: FakeEngine) -> None:
    """A list of token ids, or a list holding one, is passed through without tokenizing."""
    for prompt in ([104, 105], [[104, 105]], ["hi"]):
        assert complete(client, prompt=prompt).json()["choices"][0]["text"] == "ih"
    assert [list(r.prompt_ids) for r in engine.submitted] == [[104, 105]] * 3


def test_neutral_extra_fields_are_accepted(client: TestClient) -> None:
    """Fields clients send by default (neutral penalties, logprobs null, user, unknown) pass."""
    extras: dict[str, Any] = {
        "logprobs": None, "frequency_penalty": 0, "presence_penalty": 0.0, "user": "u1", "n": 1,
        "echo": False, "best_of": 1, "logit_bias": {}, "something_new": [1],
    }
    assert complete(client, prompt="hello", **extras).json()["choices"][0]["text"] == "olleh"
    chat_extras: dict[str, Any] = {
        "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
        "response_format": {"type": "text"}, "parallel_tool_calls": True,
    }
    assert chat(client, messages=CHAT, **chat_extras).status_code == 200


def test_completion_stream_with_usage(client: TestClient, engine: FakeEngine) -> None:
    """SSE: one chunk per token, a finish chunk carrying the plan, a usage chunk, [DONE]."""
    chunks = events(complete(client, prompt="hello", stream=True,
                             stream_options={"include_usage": True}))
    *pieces, closing, usage = chunks
    assert "".join(c["choices"][0]["text"] for c in pieces) == "olleh"
    assert all(c["choices"][0]["finish_reason"] is None for c in pieces)
    assert closing["choices"][0]["finish_reason"] == "stop" and "tetris" in closing
    assert all("tetris" not in c and c["usage"] is None for c in [*pieces])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert len({c["id"] for c in chunks}) == 1 and engine.cancels == []


def test_chat(client: TestClient) -> None:
    """A chat completion answers as the assistant, through the engine's chat template."""
    body = chat(client, messages=CHAT).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "cba :resu"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "bc"}]}]
    assert chat(client, messages=parts).json()["choices"][0]["message"]["content"] == "cb\na :resu"


def test_chat_token_limits(client: TestClient, engine: FakeEngine) -> None:
    """Without a limit, chat may fill the context; max_completion_tokens wins over max_tokens."""
    chat(client, messages=CHAT)
    assert engine.submitted[0].sampling.max_tokens == engine.context_tokens - 9
    chat(client, messages=CHAT, max_tokens=2)
    chat(client, messages=CHAT, max_tokens=2, max_completion_tokens=4)
    assert [r.sampling.max_tokens for r in engine.submitted[1:]] == [2, 4]


def test_chat_stream(client: TestClient) -> None:
    """Chat SSE: a role chunk, content deltas, an empty delta with the finish reason, [DONE]."""
    first, *pieces, closing = events(chat(client, messages=CHAT, stream=True, max_tokens=4))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in pieces) == "cba "
    assert closing["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                     "finish_reason": "length"}
    assert closing["tetris"]["decode_instances"] == [2]
    assert all("usage" not in c for c in [first, *pieces, closing])


def test_models_health_plan(client: TestClient) -> None:
    """/v1/models lists the served model, /health is ok, /v1/tetris/plan is the live plan."""
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/tetris/plan").json() == LIVE_PLAN
    assert_error(client.get("/v1/nothing"), 404)


# -- client errors -----------------------------------------------------------------------------
def test_malformed_json(client: TestClient) -> None:
    """A body that is not JSON is a 400 invalid_request_error."""
    response = client.post("/v1/completions", content=b'{"model": "fake-model", "prompt": ',
                           headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_error(response, 400)
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert_still_serves(client)


def test_wrong_type_names_field(client: TestClient) -> None:
    """A known field of the wrong type is a 400 naming it, never coerced (nor FastAPI's 422)."""
    assert_error(complete(client, prompt="hi", max_tokens="5"), 400, param="max_tokens")
    assert_error(complete(client, prompt=5), 400, param="prompt")
    assert_error(chat(client, messages=[{"role": "user", "content": 3}]), 400,
                 param="messages[0].content")
    assert_still_serves(client)


def test_max_tokens_zero(client: TestClient) -> None:
    """max_tokens 0 (or below) is a 400 naming max_tokens."""
    assert_error(complete(client, prompt="hi", max_tokens=0), 400, param="max_tokens")
    assert_error(chat(client, messages=CHAT, max_completion_tokens=-1), 400,
                 param="max_completion_tokens")
    assert_still_serves(client)


def test_empty_prompt(client: TestClient) -> None:
    """An empty prompt, string or token list, is a 400 naming prompt."""
    for prompt in ("", [], [""]):
        assert_error(complete(client, prompt=prompt), 400, param="prompt")
    assert_still_serves(client)


def test_empty_messages(client: TestClient) -> None:
    """No messages, or messages without any text, is a 400 naming messages."""
    assert_error(chat(client, messages=[]), 400, param="messages")
    assert_error(chat(client, messages=[{"role": "user", "content": ""}]), 400, param="messages")
    assert_still_serves(client)


def test_more_than_one_choice(client: TestClient) -> None:
    """n=2 (and other non-neutral unsupported options) is a 400 naming the option."""
    assert "only 1" in assert_error(complete(client, prompt="hi", n=2), 400, param="n")
    assert_error(chat(client, messages=CHAT, frequency_penalty=0.5), 400,
                 param="frequency_penalty")
    assert_error(complete(client, prompt=["a", "b"]), 400, param="prompt")
    assert_still_serves(client)


def test_unknown_model(client: TestClient) -> None:
    """A model other than the served one is a 404 model_not_found naming it."""
    message = assert_error(complete(client, model="gpt-17", prompt="hi"), 404, param="model",
                           code="model_not_found")
    assert "gpt-17" in message
    assert_still_serves(client)


def test_queue_full(client: TestClient, engine: FakeEngine) -> None:
    """The engine's QueueFull is a 429."""
    engine.queue_full = True
    response = chat(client, messages=CHAT)
    assert_error(response, 429, code="queue_full")
    assert response.json()["error"]["type"] == "rate_limit_error"
    engine.queue_full = False
    assert_still_serves(client)


def test_rejected_over_context(client: TestClient) -> None:
    """The engine's RequestRejected (prompt + max_tokens over the context) is a 400 with param."""
    message = assert_error(complete(client, prompt="hello", max_tokens=300), 400,
                           param="max_tokens")
    assert "256" in message
    assert_still_serves(client)


def test_not_serving(client: TestClient, engine: FakeEngine) -> None:
    """An engine that is not serving: /health and generation are 503, until it serves again."""
    engine.is_serving = False
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert_error(complete(client, prompt="hi"), 503, code="engine_not_serving")
    assert_error(chat(client, messages=CHAT, stream=True), 503, code="engine_not_serving")
    assert engine.submitted == []
    engine.is_serving = True
    assert client.get("/health").status_code == 200
    assert_still_serves(client)


# -- engine failures and departed clients ------------------------------------------------------
def test_engine_failure_is_reported(client: TestClient, engine: FakeEngine) -> None:
    """A stream that raises: 500 JSON, or an SSE error event then [DONE]; the KV is freed."""
    engine.fail_after = 2
    response = complete(client, prompt="hello")
    rid = response.headers["x-request-id"]
    assert rid in assert_error(response, 500, code="internal_error")
    streamed = complete(client, prompt="hello", stream=True)
    *pieces, error = events(streamed)
    assert "".join(c["choices"][0]["text"] for c in pieces) == "ol"
    assert error["error"]["type"] == "server_error"
    assert streamed.headers["x-request-id"] in error["error"]["message"]
    assert engine.cancels == [r.request_id for r in engine.submitted]
    engine.fail_after = None
    assert_still_serves(client)
