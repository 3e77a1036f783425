"""The HTTP layer under a real uvicorn server, driven by the official `openai` client."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import openai
import pytest
import uvicorn
from fastapi import FastAPI

from tests.fake_engine import FakeEngine
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.server.app import create_app

MODEL = "fake-model"


@contextmanager
def serve(app: FastAPI, start_timeout_s: float = 10.0) -> Iterator[str]:
    """uvicorn on 127.0.0.1, a free port, in a thread; stopped on exit. Yields the /v1 URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_openai_client_against_uvicorn() -> None:
    """Chat streaming, completions, errors and an abandoned stream, through the openai client."""
    engine = FakeEngine(ServingMetrics())
    with serve(create_app(engine, engine.metrics)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=10)

        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "abc"}], stream=True,
            stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "cba :resu"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 9, 18)

        completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
        assert completion.choices[0].text == "oll"
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.total_tokens == 8
        assert (completion.model_extra or {})["tetris"]["decode_instances"] == [2]
        assert [m.id for m in client.models.list()] == [MODEL]

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-17", prompt="hello")
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=MODEL, prompt="hello", n=2)
        assert bad.value.param == "n"

        # The client walks away after the first chunk: the engine must free the request.
        engine.token_delay_s = 0.02
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * 200}], stream=True)
        next(iter(stream))
        stream.close()
        abandoned = engine.submitted[-1].request_id
        assert wait_for(lambda: abandoned in engine.cancels), "cancel() was not called"
        assert engine.streams[-1].summary.completion_tokens < 200
        assert engine.cancels == [abandoned]
