"""`tetris serve` end to end on the embedded SmolLM2 (Ray actors, 2 prefill + 1 decode
instances, 127.0.0.1), driven by the official `openai` client: greedy answers equal HF
transformers' token for token, streaming, 16 concurrent streams and a 17th refused with 429,
metrics, the live plan, bad requests, and a client that leaves mid-stream."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live import hf_greedy as greedy_of
from tests.live import hf_model, live_daemon
from tetris.runtime.deployment import Deployment
from tetris.runtime.ports import free_port
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig
from tetris.solver.plan_json import PlanReport

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

MAX_QUEUE = 16
MODEL = "smollm2"
PARAGRAPH = ("The history of astronomy is the story of how people came to understand the sky. "
             "Early observers tracked the motions of the Sun, the Moon and the planets, and "
             "built calendars around them. Telescopes revealed moons around Jupiter. ")
SHORT_CHATS = ["What is the capital of France?", "Name three colours.",
               "Write one sentence about the sea.", "Count from one to five."]


@pytest.fixture(scope="module")
def served(ray_session: Any) -> Iterator[tuple[str, Deployment]]:
    config = ServeConfig(port=free_port(), max_queue=MAX_QUEUE, kv_tokens_per_instance=8192,
                         policy=SERVE_POLICY.model_copy(update={"quantum_s": 0.5}))
    with live_daemon(config) as served:
        yield served


@pytest.fixture(scope="module")
def client(served: tuple[str, Deployment]) -> Any:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


@pytest.fixture(scope="module")
def hf(served: tuple[str, Deployment]) -> Any:
    return hf_model(served[1].model_dir)


def hf_greedy(hf: Any, deployment: Deployment, prompt: list[int], max_tokens: int) -> list[int]:
    return greedy_of(hf, deployment.engine.tokenizer.eos_ids, prompt, max_tokens)


def chat_ids(deployment: Deployment, text: str) -> list[int]:
    return deployment.engine.encode_chat([{"role": "user", "content": text}])


def test_greedy_answers_equal_hf_token_for_token(served: tuple[str, Deployment], client: Any,
                                                 hf: Any) -> None:
    """Non-streaming greedy chat and completion answers (one prompt ≥ 1,500 tokens, prefilled
    in several chunks over both prefill instances) are HF's greedy tokens exactly."""
    _, deployment = served
    long_text = PARAGRAPH * 33 + "\nSummarize the text above in one sentence."
    cases = [("chat", SHORT_CHATS[0]), ("completion", "The three primary colours are"),
             ("chat", long_text)]
    for kind, text in cases:
        if kind == "chat":
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=20,
                temperature=0)
            prompt, content = chat_ids(deployment, text), reply.choices[0].message.content
        else:
            reply = client.completions.create(model=MODEL, prompt=text, max_tokens=20,
                                              temperature=0)
            prompt, content = deployment.engine.encode(text), reply.choices[0].text
        info = reply.model_extra["tetris"]
        expected = hf_greedy(hf, deployment, prompt, 20)
        assert info["token_ids"] == expected, kind
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.usage.completion_tokens == len(expected)
        assert content == deployment.engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert len(prompt) >= 1500
    used = {g for c in info["chunks"] for g in c["instances"]}
    assert len(info["chunks"]) >= 2 and used == {0, 1}, info["chunks"]


def test_streamed_chat_equals_the_non_streamed_answer(client: Any) -> None:
    """A streamed greedy chat completion: role first, content deltas, a finish reason, usage
    when asked; the text is the non-streamed answer's."""
    messages = [{"role": "user", "content": SHORT_CHATS[1]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                           temperature=0).choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole
    assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_seeded_sampling_is_reproducible(client: Any) -> None:
    """temperature 0.9 with the same seed gives the same answer (the sampler's stream moves
    from the prefill instance to the decode instance)."""
    def ask() -> str:
        return str(client.completions.create(model=MODEL, prompt="Once upon a time",
                                             max_tokens=12, temperature=0.9, seed=7,
                                             top_p=0.95).choices[0].text)
    assert ask() == ask()


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_sixteen_concurrent_streams_and_a_seventeenth_gets_429(
        served: tuple[str, Deployment], client: Any, hf: Any) -> None:
    """16 streaming clients (the queue bound) all finish with HF's greedy text; a 17th sent
    while they are all in flight gets 429; the TTFT histogram counts all 16."""
    url, deployment = served
    before = metric(url, "tetris:time_to_first_token_seconds_count")
    started = threading.Barrier(MAX_QUEUE + 1, timeout=300)
    texts: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": SHORT_CHATS[i % 4]}],
                max_tokens=24, temperature=0, stream=True)
            parts, waited = [], False
            for chunk in stream:
                if not waited:
                    started.wait()  # every stream is admitted before the 17th is sent
                    waited = True
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
            texts[i] = "".join(parts)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(MAX_QUEUE)]
    for t in threads:
        t.start()
    started.wait()
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, stream=True)
    assert refused.value.status_code == 429
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    tok = deployment.engine.tokenizer
    for i in range(4):
        want = tok.decode(hf_greedy(hf, deployment, chat_ids(deployment, SHORT_CHATS[i]), 24),
                          skip_special_tokens=True)
        assert [texts[j] for j in range(i, MAX_QUEUE, 4)] == [want] * 4
    assert metric(url, "tetris:time_to_first_token_seconds_count") - before == MAX_QUEUE


@pytest.mark.parametrize(("path", "payload", "lines"), [
    # Chat streams open with a role chunk: leaving right after it cancels during prefill.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PARAGRAPH * 30}]}, 1),
    # Leaving after a few tokens cancels during decode.
    ("/v1/completions", {"prompt": PARAGRAPH * 4}, 3),
])
def test_client_leaving_mid_stream_frees_its_kv(served: tuple[str, Deployment], path: str,
                                                payload: dict[str, Any], lines: int) -> None:
    """A stream closed early (in prefill, or in decode): the engine forgets the request, its
    prefill KV ledger is back to 0 and every actor's KV cache is empty again."""
    url, deployment = served
    body = json.dumps({"model": MODEL, "max_tokens": 200, "stream": True, "temperature": 0,
                       **payload}).encode()
    request = urllib.request.Request(url + path, data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        for _ in range(lines):
            reply.readline()
    engine, pool, ray = deployment.engine, deployment.pool, deployment.ray
    deadline = time.monotonic() + 120
    while len(engine.requests) or not engine.ledger.is_empty():
        assert time.monotonic() < deadline, "the request was not dropped"
        time.sleep(0.1)
    # The engine's frees are fire-and-forget calls from its own thread: this thread's query
    # may overtake them, so the caches are watched until they are empty.
    room = [pool.prefill_kv_tokens] * pool.num_prefill + [pool.decode_kv_tokens] * len(pool.decode)
    while (free := ray.get([a.free_tokens.remote() for a in pool.all], timeout=60)) != room:
        assert time.monotonic() < deadline, f"KV left on the actors: free {free} of {room}"
        time.sleep(0.1)


def post(url: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url + path, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), 400,
     "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 10**6}).encode(), 400,
     "max_tokens"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), 404, "model"),
])
def test_bad_request_gets_its_status_and_the_daemon_keeps_serving(
        served: tuple[str, Deployment], body: bytes, status: int, param: str | None) -> None:
    """Each bad request: its status and OpenAI error JSON; a good request right after works."""
    url, _ = served
    code, answer = post(url, "/v1/completions", body)
    assert code == status
    assert set(answer["error"]) >= {"message", "type", "param", "code"}
    if param is not None:
        assert answer["error"]["param"] == param
    if body.endswith(b"1000000}"):
        assert "8192" in answer["error"]["message"]  # names the context limit
    ok, good = post(url, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "Hello", "max_tokens": 2}).encode())
    assert ok == 200 and good["usage"]["completion_tokens"] >= 1


def rss_bytes() -> int:
    """This process's resident memory: the daemon under test serves from a thread of it."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:"))) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize(("size", "status", "param"), [(20_000_000, 413, None),
                                                       (5_000_000, 400, "prompt")],
                         ids=["over-the-body-limit", "longer-than-any-tokenization"])
def test_a_huge_prompt_is_refused_at_once_without_memory_growth(
        served: tuple[str, Deployment], size: int, status: int, param: str | None) -> None:
    """A 20 MB body gets a 413 and a 5 MB prompt (under the 8 MiB body limit, but longer than
    the 8,192-token context could hold in any tokenization) a 400 naming `prompt`, each in
    under 1 s, with this process's RSS growing by under 200 MB; the daemon serves on."""
    url, _ = served
    body = json.dumps({"model": MODEL, "prompt": "word " * (size // 5), "max_tokens": 2})
    before = rss_bytes()
    started = time.monotonic()
    code, answer = post(url, "/v1/completions", body.encode())
    elapsed = time.monotonic() - started
    assert code == status and answer["error"]["param"] == param
    assert elapsed < 1.0
    assert rss_bytes() - before < 200 * 2**20
    ok, _ = post(url, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "Hello", "max_tokens": 2}).encode())
    assert ok == 200


def test_unencodable_text_is_a_400_naming_the_field(served: tuple[str, Deployment]) -> None:
    """A lone UTF-16 surrogate in a prompt and in chat content: 400 naming each field."""
    url, _ = served
    for path, body, param in (
            ("/v1/completions", '{"model": "smollm2", "prompt": "x \\ud800 y"}', "prompt"),
            ("/v1/chat/completions", '{"model": "smollm2", "messages": [{"role": "user", '
             '"content": "x \\ud800 y"}]}', "messages[0].content")):
        code, answer = post(url, path, body.encode())
        assert code == 400 and answer["error"]["param"] == param, answer


def test_live_plan_and_health(served: tuple[str, Deployment], tmp_path: Path) -> None:
    """/v1/tetris/plan is a valid plan report (drawn by `tetris plan --from-server`); /health
    is 200."""
    url, _ = served
    with urllib.request.urlopen(f"{url}/v1/tetris/plan", timeout=30) as reply:
        report = PlanReport.model_validate(json.loads(reply.read()))
    assert len(report.availability_s) == 2
    with urllib.request.urlopen(f"{url}/health", timeout=30) as reply:
        assert reply.status == 200
    from tetris.cli.main import main

    gantt = tmp_path / "plan.png"
    assert main(["plan", "--from-server", url, "--gantt", str(gantt)]) == 0
    assert gantt.stat().st_size > 0
