"""Faults on live Ray actors of the embedded SmolLM2: a rank raising inside a collective frees
its peer within the collective timeout; in the daemon, a prefill actor killed in the middle of
a chunk and a decode actor killed in the middle of a stream both leave their requests complete
with HF's greedy tokens, `/health` answering throughout, and the replacement actor serving."""

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
from tetris.runtime.actors import WorkerPool
from tetris.runtime.deployment import Deployment
from tetris.runtime.faults import Fault
from tetris.runtime.ports import free_port
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig
from tetris.solver.plan import ChunkSpec

transformers = pytest.importorskip("transformers")

TIMEOUT_S = 3.0
TEXT = ("Glaciers move slowly down mountain valleys, carving the rock beneath them and leaving "
        "long ridges of stones where they melt. ")


def test_a_rank_raising_mid_collective_releases_its_peer_within_the_timeout(
        ray_session: Any, smollm2_dir: Path) -> None:
    """Rank 1 of {0, 1} raises at layer 5 of a chunk: rank 0, waiting for it in that layer's
    collective, fails within the 3 s collective timeout (plus one layer's compute), not
    gloo's default 30 min; after a new world the pair runs a chunk normally."""
    pool = WorkerPool.start(ray_session, smollm2_dir, 2, 1, prefill_kv_tokens=2048,
                            decode_kv_tokens=2048, collective_timeout_s=TIMEOUT_S)
    try:
        chunk = ChunkSpec(0, 256, (0, 1))
        pool.ensure_group(chunk.instances)
        ray_session.get(pool.prefill[1].arm_fault.remote(Fault("prefill", "raise", 5)))
        started = time.monotonic()
        refs = [pool.prefill[r].prefill.remote("x", chunk, [1] * 256, None) for r in (0, 1)]
        for ref in refs:
            with pytest.raises(Exception):  # noqa: B017 - the injected fault, or the timeout
                ray_session.get(ref, timeout=60)
        assert time.monotonic() - started < TIMEOUT_S + 5.0
        address, port = ray_session.get(pool.actor(0).rendezvous.remote(True))
        ray_session.get(pool.reform(address, port), timeout=60)
        ray_session.get([pool.actor(r).free.remote("x") for r in (0, 1)])
        pool.ensure_group(chunk.instances)
        done = ray_session.get([pool.prefill[r].prefill.remote("y", chunk, [1] * 256, None)
                                for r in (0, 1)], timeout=60)
        assert len(done) == 2
    finally:
        pool.shutdown(ray_session)


@pytest.fixture(scope="module")
def served(ray_session: Any) -> Iterator[tuple[str, Deployment]]:
    config = ServeConfig(port=free_port(), prefill_instances=2, decode_instances=2,
                         kv_tokens_per_instance=4096, collective_timeout_s=TIMEOUT_S,
                         policy=SERVE_POLICY.model_copy(update={"decode_max_sp": 1}))
    with live_daemon(config) as served:
        yield served


@pytest.fixture(scope="module")
def hf(served: tuple[str, Deployment]) -> Any:
    return hf_model(served[1].model_dir)


def hf_greedy(hf: Any, deployment: Deployment, prompt: list[int], n: int) -> list[int]:
    return greedy_of(hf, deployment.engine.tokenizer.eos_ids, prompt, n)


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        result: dict[str, Any] = json.load(reply)
    return result


class HealthWatch:
    """Polls /health every 50 ms on a thread; records every status code (or the error)."""

    def __init__(self, url: str) -> None:
        self.url, self.codes, self.bodies = url, [], []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    self.codes.append(reply.status)
                    self.bodies.append(json.load(reply))
            except urllib.error.HTTPError as err:
                self.codes.append(err.code)
            except OSError as err:
                self.codes.append(repr(err))
            time.sleep(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_healthy(deployment: Deployment, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while deployment.engine.health().status != "ok":
        assert time.monotonic() < deadline, "the lost instance was not replaced in time"
        time.sleep(0.1)


@pytest.mark.parametrize(("rank", "point", "tokens"),
                         [(1, "prefill", 12), (2, "decode", 24)],
                         ids=["prefill-actor", "decode-actor"])
def test_an_actor_killed_mid_work_leaves_its_request_exact(
        served: tuple[str, Deployment], hf: Any, rank: int, point: str, tokens: int) -> None:
    """The actor of `rank` exits (as kill -9 would end it) at layer 10 of its next chunk or
    decode step while serving a 1,200-token greedy completion: the answer is still HF's
    greedy tokens, /health answered every poll (200: the other instance of the role serves),
    the loss and the recovered request are counted, and after the replacement joins, a second
    request is exact too and the replaced rank serves."""
    url, deployment = served
    engine = deployment.engine
    wait_healthy(deployment)
    prompt = deployment.engine.encode(TEXT * 60)[:1200]
    assert len(prompt) == 1200
    expected = hf_greedy(hf, deployment, prompt, tokens)
    lost_before = engine.instances_lost
    # The policy spreads a 1,200-token prompt over both prefill instances, so rank 1 works.
    deployment.ray.get(deployment.pool.actor(rank).arm_fault.remote(
        Fault(point, "exit", 10)))  # type: ignore[arg-type]
    with HealthWatch(url) as watch:
        reply = post(url, {"model": "smollm2", "prompt": prompt, "max_tokens": tokens,
                           "temperature": 0})
        wait_healthy(deployment)
    assert reply["tetris"]["token_ids"] == expected
    assert engine.instances_lost == lost_before + 1
    assert watch.codes and all(code == 200 for code in watch.codes), set(map(str, watch.codes))
    assert any(b["status"] == "degraded" for b in watch.bodies)
    again = post(url, {"model": "smollm2", "prompt": prompt, "max_tokens": tokens,
                       "temperature": 0})
    assert again["tetris"]["token_ids"] == expected
    used = {g for c in again["tetris"]["chunks"] for g in c["instances"]}
    used |= {deployment.pool.num_prefill + j for j in again["tetris"]["decode_instances"]}
    assert rank in used
    assert deployment.ray.get(deployment.pool.actor(rank).ping.remote(), timeout=30) == rank
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "tetris:instance_failures_total" in metrics
    assert "tetris:requests_recovered_total" in metrics
