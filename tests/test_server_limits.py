"""Work the HTTP layer refuses before doing it: bodies over the limit (unread), text too long for
the context (untokenized), and tokenizing beyond what the queue can take."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from tests.fake_engine import MAX_TOKEN_CHARS, FakeEngine
from tests.test_server_app import MODEL, assert_error, chat, complete
from tests.test_server_openai import serve
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server.app import create_app

LIMIT = 64 * 1024


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(ServingMetrics())


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(engine, engine.metrics, max_body_bytes=LIMIT,
                     max_token_chars=MAX_TOKEN_CHARS)
    with TestClient(app) as c:
        yield c


# -- body limit --------------------------------------------------------------------------------
def test_big_body_is_refused_at_once(engine: FakeEngine) -> None:
    """A 20 MB body over the default limit: 413 in the OpenAI shape, well under a second."""
    body = json.dumps({"model": MODEL, "prompt": "x" * 20_000_000}).encode()
    with TestClient(create_app(engine, engine.metrics)) as client:
        started = time.perf_counter()
        response = client.post("/v1/completions", content=body,
                               headers={"content-type": "application/json"})
        seconds = time.perf_counter() - started
    assert_error(response, 413, code="body_too_large")
    assert seconds < 0.5 and engine.submitted == [] and engine.encoded == []


def test_chunked_body_over_the_limit_is_refused(client: TestClient, engine: FakeEngine) -> None:
    """A body without Content-Length is counted as it arrives: over the limit is a 413."""
    payload = json.dumps({"model": MODEL, "prompt": "x" * (2 * LIMIT)}).encode()
    response = client.post("/v1/completions", content=iter([payload[:100], payload[100:]]),
                           headers={"content-type": "application/json"})
    assert "transfer-encoding" in response.request.headers
    assert_error(response, 413, code="body_too_large")
    assert engine.submitted == []
    assert complete(client, prompt="hello").status_code == 200  # under the limit: served


def test_big_bodies_under_uvicorn(engine: FakeEngine) -> None:
    """Under a real server too: 413 for a declared and for a chunked 20 MB body, then serving."""
    body = json.dumps({"model": MODEL, "prompt": "x" * 20_000_000}).encode()
    headers = {"content-type": "application/json"}
    with serve(create_app(engine, engine.metrics)) as url:
        for content in (body, iter([body[i:i + 10**6] for i in range(0, len(body), 10**6)])):
            started = time.perf_counter()
            response = httpx2.post(f"{url}/completions", content=content, headers=headers,
                                   timeout=10)
            assert_error(response, 413, code="body_too_large")
            assert time.perf_counter() - started < 1.0
        ok = httpx2.post(f"{url}/completions", json={"model": MODEL, "prompt": "hi"}, timeout=10)
        assert ok.json()["choices"][0]["text"] == "ih"
    assert engine.encoded == ["hi"]


def test_streamed_body_stops_being_read_at_the_limit(engine: FakeEngine) -> None:
    """Raw ASGI: the app reads no more chunks of an endless body once it passes the limit."""
    app = create_app(engine, engine.metrics, max_body_bytes=LIMIT)
    reads = 0
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b" " * 16384, "more_body": True}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    assert sent[0]["status"] == 413 and reads == LIMIT // 16384 + 1
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"


# -- text too long for the context -------------------------------------------------------------
def test_text_longer_than_the_context_is_refused_untokenized(client: TestClient,
                                                             engine: FakeEngine) -> None:
    """More characters than context × max_token_chars: 400 naming the field, no tokenizing."""
    too_long = "x" * (engine.context_tokens * MAX_TOKEN_CHARS + 1)
    message = assert_error(complete(client, prompt=too_long), 400, param="prompt")
    assert "256 tokens" in message
    half = too_long[: len(too_long) // 2 + 1]
    assert_error(chat(client, messages=[{"role": "system", "content": half},
                                        {"role": "user", "content": half}]),
                 400, param="messages")
    assert engine.encoded == []
    # At the bound itself the text may fit, so it is tokenized (and the engine judges it).
    assert_error(complete(client, prompt=too_long[:-1], max_tokens=1), 400, param="max_tokens")
    assert len(engine.encoded) == 1


def test_max_tokens_past_the_context_is_refused_untokenized(client: TestClient,
                                                            engine: FakeEngine) -> None:
    """max_tokens that leaves no room for a prompt: 400 naming the field that said so."""
    assert_error(complete(client, prompt="hi", max_tokens=256), 400, param="max_tokens")
    assert_error(chat(client, messages=[{"role": "user", "content": "hi"}],
                      max_completion_tokens=10**6), 400, param="max_completion_tokens")
    assert_error(chat(client, messages=[{"role": "user", "content": "hi"}], max_tokens=300,
                      max_completion_tokens=4), 400, param="max_tokens")
    assert engine.encoded == []


# -- tokenizing takes a place in the queue -----------------------------------------------------
def test_tokenizing_holds_a_queue_slot(client: TestClient, engine: FakeEngine) -> None:
    """With room for one, a second request is a 429 while the first is still tokenizing."""
    engine.max_queue = 1
    engine.encode_gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(complete, client, prompt="hello")
        assert engine.encode_entered.wait(timeout=10)
        second = chat(client, messages=[{"role": "user", "content": "abc"}])
        engine.encode_gate.set()
        assert first.result(timeout=10).json()["choices"][0]["text"] == "olleh"
    assert_error(second, 429, code="queue_full")
    assert second.headers["retry-after"] == "1"
    assert engine.encoded == ["hello"]


def test_slots_are_released_whatever_happens(client: TestClient, engine: FakeEngine) -> None:
    """Refusals after taking a slot (engine 400, engine 429, bad chat) all give it back."""
    engine.max_queue = 1
    assert_error(complete(client, prompt="hello", max_tokens=255), 400, param="max_tokens")
    engine.queue_full = True
    assert_error(complete(client, prompt="hello"), 429, code="queue_full")
    engine.queue_full = False
    assert_error(chat(client, messages=[{"role": "user", "content": "x" * 250}]), 400,
                 param="messages")
    assert complete(client, prompt="hello").status_code == 200


# -- Tokenizer.max_token_chars -----------------------------------------------------------------
def _hf_tokenizer(normalizer: Any = None, pre_tokenizer: Any = None) -> Any:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges))
    raw.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    if normalizer is not None:
        raw.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=raw)


def test_max_token_chars_bounds_what_a_token_covers() -> None:
    """Byte-level BPE: the longest entry's length, times 4 under NFC; no bound when text may
    vanish (BERT's normalizer, whitespace splitting); the bound holds on awkward text."""
    from tokenizers import normalizers, pre_tokenizers

    from tetris.models.tokenizer import Tokenizer

    plain = Tokenizer(_hf_tokenizer())
    assert plain.max_token_chars == len("Ġthe")
    for text in (" the the the", "é e\u0301 \U0001f600 \x00\x00 " * 3, "\u1100\u1161\u11a8"):
        assert len(text) <= len(plain.encode(text)) * plain.max_token_chars
    assert Tokenizer(_hf_tokenizer(normalizers.NFC())).max_token_chars == 4 * len("Ġthe")
    assert Tokenizer(_hf_tokenizer(normalizers.BertNormalizer())).max_token_chars is None
    assert Tokenizer(_hf_tokenizer(pre_tokenizer=pre_tokenizers.Whitespace())
                     ).max_token_chars is None
