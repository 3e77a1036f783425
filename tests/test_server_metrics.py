"""ServingMetrics: vLLM-style names on a private registry, fed by the engine, served at /metrics."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from tests.fake_engine import FakeEngine
from tetris.runtime.metrics import LATENCY_BUCKETS_S, ServingMetrics
from tetris.runtime.server.app import create_app


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line `name{labels} value` in the exposition text."""
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"no sample {name}{{{labels}}}"
    return float(match.group(1))


def test_every_method_renders_its_metric() -> None:
    """Each engine-facing method shows up under its `tetris:` name, with its labels."""
    m = ServingMetrics()
    m.observe_ttft(0.004)
    m.observe_inter_token(0.02)
    m.observe_e2e(3.0)
    m.observe_queue_time(0.5)
    m.observe_solver(0.0002)
    m.set_requests(running=3, waiting=5)
    m.set_instance_busy("2", "prefill", 0.75)
    m.count_chunk(4)
    m.count_chunk(4)
    m.count_tokens(prompt=100, generation=7)
    m.request_finished("length")
    body, content_type = m.render()
    text = body.decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert sample(text, "tetris:time_to_first_token_seconds_bucket", 'le="0.005"') == 1
    assert sample(text, "tetris:time_to_first_token_seconds_bucket", 'le="0.0025"') == 0
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency",
                 "request_queue_time", "solver_latency"):
        assert sample(text, f"tetris:{name}_seconds_count") == 1
    assert sample(text, "tetris:num_requests_running") == 3
    assert sample(text, "tetris:num_requests_waiting") == 5
    assert sample(text, "tetris:instance_busy_fraction", 'instance="2",role="prefill"') == 0.75
    assert sample(text, "tetris:prefill_chunks_total", 'sp="4"') == 2
    assert sample(text, "tetris:prompt_tokens_total") == 100
    assert sample(text, "tetris:generation_tokens_total") == 7
    assert sample(text, "tetris:request_success_total", 'finished_reason="length"') == 1


def test_buckets_cover_gpu_and_cpu_latencies() -> None:
    """Buckets run from sub-millisecond (GPU inter-token) to many minutes (CPU 128k prefill)."""
    assert LATENCY_BUCKETS_S[0] <= 0.0005 and LATENCY_BUCKETS_S[-1] >= 600
    assert list(LATENCY_BUCKETS_S) == sorted(set(LATENCY_BUCKETS_S))
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS_S)]
    assert max(ratios) <= 2.5 + 1e-9  # no gap wider than 2.5x: percentiles stay meaningful


def test_registries_are_private() -> None:
    """Two instances do not share samples, and nothing lands in the global registry."""
    a, b = ServingMetrics(), ServingMetrics()
    a.count_tokens(5, 1)
    assert sample(b.render()[0].decode(), "tetris:prompt_tokens_total") == 0
    assert not any(name.startswith("tetris:") for name in REGISTRY._names_to_collectors)


def test_bad_values_are_loud() -> None:
    """Negative or NaN durations and counts raise; a busy fraction just outside [0, 1] clamps."""
    m = ServingMetrics()
    nan = float("nan")
    calls: list[Callable[[], None]] = [
        lambda: m.observe_ttft(-0.1), lambda: m.observe_e2e(nan), lambda: m.count_tokens(-1, 0),
        lambda: m.set_requests(-1, 0), lambda: m.count_chunk(0),
        lambda: m.set_instance_busy("0", "decode", nan),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    m.set_instance_busy("0", "decode", 1.0000001)
    text = m.render()[0].decode()
    assert sample(text, "tetris:instance_busy_fraction", 'instance="0",role="decode"') == 1.0


def test_metrics_endpoint_counts_requests() -> None:
    """After requests through the app, /metrics shows the engine's counts for them."""
    engine = FakeEngine(ServingMetrics())
    with TestClient(create_app(engine, engine.metrics)) as client:
        for prompt, stream in (("hello", False), ("abc", True), ("xy", False)):
            response = client.post("/v1/completions", json={"model": "fake-model",
                                                             "prompt": prompt, "stream": stream})
            assert response.status_code == 200
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert sample(text, "tetris:time_to_first_token_seconds_count") == 3
    assert sample(text, "tetris:e2e_request_latency_seconds_count") == 3
    assert sample(text, "tetris:inter_token_latency_seconds_count") == (5 - 1) + (3 - 1) + (2 - 1)
    assert sample(text, "tetris:prompt_tokens_total") == 10
    assert sample(text, "tetris:generation_tokens_total") == 10
    assert sample(text, "tetris:request_success_total", 'finished_reason="stop"') == 3
    assert sample(text, "tetris:prefill_chunks_total", 'sp="2"') == 3
    assert sample(text, "tetris:num_requests_running") == 0
