"""Hostile and unusual request bodies: each is served or refused with a 400 naming its field,
never a 500 (unencodable text, every OpenAI option we do not implement, absurd numbers, JSON
that breaks parsers)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response

from tests.fake_engine import MAX_TOKEN_CHARS, VOCAB_SIZE, FakeEngine
from tests.test_server_app import CHAT, MODEL, assert_error, assert_still_serves, events
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server.app import create_app

COMPLETIONS, CHATS = "/v1/completions", "/v1/chat/completions"
BASE: dict[str, dict[str, Any]] = {COMPLETIONS: {"model": MODEL, "prompt": "hello"},
                                   CHATS: {"model": MODEL, "messages": CHAT}}
SURROGATE = "x \ud800 y"  # json.dumps writes it as the escape "\ud800", which JSON allows


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(ServingMetrics())


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(engine, engine.metrics, max_token_chars=MAX_TOKEN_CHARS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, path: str, **fields: Any) -> Response:
    # Serialized here: ASCII JSON, so a lone surrogate travels as its escape.
    body = json.dumps({**BASE[path], **fields}).encode()
    return client.post(path, content=body, headers={"content-type": "application/json"})


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


# -- text that is not text ---------------------------------------------------------------------
@pytest.mark.parametrize(("path", "fields", "param"), [
    (COMPLETIONS, {"prompt": SURROGATE}, "prompt"),
    (COMPLETIONS, {"prompt": [SURROGATE]}, "prompt"),
    (CHATS, {"messages": user(SURROGATE)}, "messages[0].content"),
    (CHATS, {"messages": user([{"type": "text", "text": SURROGATE}])}, "messages[0].content"),
    (COMPLETIONS, {"stop": SURROGATE}, "stop"),
    (CHATS, {"stop": ["ok", SURROGATE]}, "stop"),
    (COMPLETIONS, {"model": SURROGATE}, "model"),
    (CHATS, {"user": SURROGATE}, "user"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_lone_surrogates_are_refused(client: TestClient, path: str, fields: dict[str, Any],
                                     param: str) -> None:
    """A lone UTF-16 surrogate in any string field is a 400 naming the field."""
    message = assert_error(post(client, path, **fields), 400, param=param)
    assert "surrogate" in message and "U+D800" in message
    assert_still_serves(client)


def test_nul_is_text(client: TestClient) -> None:
    """NUL is valid UTF-8: accepted in prompts, chat and stop strings, and sent back escaped."""
    response = post(client, COMPLETIONS, prompt="a\x00b", stop=["\x00\x00"])
    assert response.json()["choices"][0]["text"] == "b\x00a"
    reply = post(client, CHATS, messages=user("\x00"), max_tokens=2).json()
    assert reply["choices"][0]["message"]["content"] == "\x00 "


def test_replacement_text_from_the_engine_is_sent(client: TestClient) -> None:
    """A token id that decodes to no valid text arrives as U+FFFD, streamed or not."""
    body = post(client, COMPLETIONS, prompt=[0xD800, 104]).json()
    assert body["choices"][0]["text"] == "h\ufffd"
    chunks = events(post(client, COMPLETIONS, prompt=[0xD800], stream=True))
    assert chunks[0]["choices"][0]["text"] == "\ufffd"


# -- OpenAI options and absurd values ----------------------------------------------------------
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (COMPLETIONS, {"n": 2}, "n"),
    (CHATS, {"n": 10**30}, "n"),
    (COMPLETIONS, {"logprobs": 1}, "logprobs"),
    (COMPLETIONS, {"logprobs": 0}, "logprobs"),
    (CHATS, {"logprobs": True}, "logprobs"),
    (CHATS, {"top_logprobs": 3}, "top_logprobs"),
    (COMPLETIONS, {"echo": True}, "echo"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
    (COMPLETIONS, {"suffix": "tail"}, "suffix"),
    (CHATS, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHATS, {"tool_choice": "required"}, "tool_choice"),
    (CHATS, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHATS, {"logit_bias": {"50256": -100}}, "logit_bias"),
    (CHATS, {"messages": user([{"type": "text", "text": "what is this?"},
                               {"type": "image_url", "image_url": {"url": "http://x/y.png"}}])},
     "messages[0].content"),
    (CHATS, {"messages": user([{"type": "input_audio", "input_audio": {}}])},
     "messages[0].content"),
    (CHATS, {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
     "messages[0].role"),
    (CHATS, {"messages": user(None)}, "messages[0].content"),
    (COMPLETIONS, {"prompt": [104, VOCAB_SIZE]}, "prompt"),
    (COMPLETIONS, {"prompt": [10**30]}, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, "prompt"),
    (COMPLETIONS, {"prompt": [1.5]}, "prompt"),
    (COMPLETIONS, {"prompt": [True]}, "prompt"),
    (COMPLETIONS, {"prompt": [[104], [105]]}, "prompt"),
    (COMPLETIONS, {"max_tokens": 10**30}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 1e30}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 2.5}, "max_tokens"),
    (CHATS, {"max_completion_tokens": 2**63}, "max_completion_tokens"),
    (COMPLETIONS, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (COMPLETIONS, {"stop": "s" * 257}, "stop"),
    (COMPLETIONS, {"stop": [""]}, "stop"),
    (COMPLETIONS, {"seed": 2**64}, "seed"),
    (COMPLETIONS, {"seed": -(2**63) - 1}, "seed"),
    (CHATS, {"seed": "7"}, "seed"),
    (CHATS, {"temperature": 1e308 * 10}, "temperature"),  # json.dumps writes Infinity
    (CHATS, {"temperature": 2.5}, "temperature"),
    (CHATS, {"top_p": 0}, "top_p"),
    (CHATS, {"stream": "yes"}, "stream"),
    (CHATS, {"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    (CHATS, {"user": 5}, "user"),
]


@pytest.mark.parametrize(("path", "fields", "param"), REFUSED,
                         ids=[f"{p.rsplit('/', 1)[1]}-{next(iter(f))}-{i}"
                              for i, (p, f, _) in enumerate(REFUSED)])
def test_unsupported_or_absurd_fields_are_a_400(client: TestClient, path: str,
                                                fields: dict[str, Any], param: str) -> None:
    """Each unimplemented option, unsupported content and absurd number: 400 naming it."""
    assert_error(post(client, path, **fields), 400, param=param)


def test_not_supported_says_so(client: TestClient) -> None:
    """The messages say what is wrong: n is not supported, image parts are not text."""
    assert "not supported" in assert_error(post(client, COMPLETIONS, n=2), 400, param="n")
    image = user([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])
    message = assert_error(post(client, CHATS, messages=image), 400, param="messages[0].content")
    assert "image_url" in message and "only text" in message


@pytest.mark.parametrize(("path", "fields"), [
    (COMPLETIONS, {"prompt": [104, 105], "max_tokens": 2.0}),
    (COMPLETIONS, {"prompt": [[104, 105]], "seed": 2**64 - 1}),
    (COMPLETIONS, {"prompt": "hi", "seed": -(2**63), "stop": ["a", "b", "c", "d"]}),
    (CHATS, {"user": "u" * 1_000_000}),
    (CHATS, {"messages": user([{"type": "text", "text": "a"}, {"type": "text", "text": ""}])}),
    (CHATS, {"messages": [{"role": "developer", "content": "be brief"}, *user("hi")],
             "name": "ignored", "parallel_tool_calls": False, "metadata": {"k": "v"}}),
    (CHATS, {"n": 1.0, "frequency_penalty": 0.0, "temperature": 0}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unusual_but_valid_bodies_are_served(client: TestClient, path: str,
                                             fields: dict[str, Any]) -> None:
    """Integral floats, edge seeds, four stops, a 1 MB `user`, unknown fields: all a 200."""
    response = post(client, path, **fields)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("body", "content_type"), [
    (b'{"model": "fake-model", "prompt": [' + b"1" * 5000 + b"]}", "application/json"),
    (b'{"model": "fake-model", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "application/json"),
    (b'{"model": "fake-model", "prompt": "hi", "temperature": NaN}', "application/json"),
    (b'["fake-model", "hi"]', "application/json"),
    (b"", "application/json"),
    (b"\xff\xfe{}", "application/json"),
    (b'{"model": "fake-model", "prompt": "hi"}', "text/plain"),
], ids=["5000-digit-int", "deep-nesting", "nan", "array-body", "empty", "bad-utf8",
        "text-plain"])
def test_bodies_that_break_parsers_are_a_400(client: TestClient, body: bytes,
                                             content_type: str) -> None:
    """Over-long integers, deep nesting, NaN, non-objects, bad UTF-8, wrong media type: 400."""
    response = client.post(COMPLETIONS, content=body, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert_still_serves(client)
