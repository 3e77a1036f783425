"""The serving engine on a fake instance pool (no Ray, no model): launches, chunk ends, KV
hand-off, decode, cancels in every phase, a failing chunk, the ledger back to zero, and a serving
loop that CP-SAT refinement never blocks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.fake_pool import FakePool, FakeTokenizer, token_after
from tests.helpers import linear_cost_model
from tetris.runtime.engine import Engine, EngineOptions
from tetris.runtime.engine_api import (
    DeadlineExceeded,
    GenerationRequest,
    RequestStream,
    TokenEvent,
)
from tetris.runtime.engine_request import EngineError
from tetris.runtime.metrics import ServingMetrics
from tetris.runtime.recovery import MAX_REDOS
from tetris.runtime.sampling import SamplingParams
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.slo import SloSpec

SETTINGS = PolicySettings(block_tokens=64, decode_max_batch=8, decode_max_sp=1)


def make_engine(pool: FakePool, policy: str = "tetris-greedy", lin: float = 1e-4,
                settings: PolicySettings = SETTINGS,
                request_timeout_s: float | None = None) -> Engine:
    """T(c, p, s) = lin·c/s on `pool`'s prefill instances; KV per instance as the pool's."""
    base = linear_cost_model(pool.num_prefill, lin=lin, kv_capacity=pool.prefill_kv_tokens)
    cluster = ClusterSpec(prefill_instances=pool.num_prefill, decode_instances=pool.num_decode,
                          gpus_per_node=pool.num_prefill + pool.num_decode)
    cm = CostModel(base.model, base.hardware, cluster, base.coefficients)
    cm.kv_capacity_tokens = pool.prefill_kv_tokens
    options = EngineOptions(max_queue=32, policy=policy, settings=settings,
                            slo=SloSpec(ttft_s=60.0), request_timeout_s=request_timeout_s)
    return Engine(pool, FakeTokenizer(), "fake", 100_000, 1 << 20, cm, options,
                  ServingMetrics())


def run(test: Callable[[Engine, FakePool], Awaitable[None]], pool: FakePool | None = None,
        **engine_kw: Any) -> None:
    async def main() -> None:
        fake = pool or FakePool()
        engine = make_engine(fake, **engine_kw)
        await engine.start()
        try:
            await asyncio.wait_for(test(engine, fake), timeout=60)
        finally:
            await engine.stop()
    asyncio.run(main())


async def submit(engine: Engine, rid: str, prompt: int, max_tokens: int = 4) -> RequestStream:
    return await engine.submit(GenerationRequest(rid, [66] * prompt,
                                                 SamplingParams(max_tokens=max_tokens)))


async def drain(stream: RequestStream) -> list[TokenEvent]:
    return [event async for event in stream]


async def settled(engine: Engine, pool: FakePool) -> None:
    """Until every request has left and the ledger holds nothing (frees are immediate here)."""
    while len(engine.requests) or not engine.ledger.is_empty():
        await asyncio.sleep(0.005)
    assert pool.held() == 0


def expected(prompt: int, tokens: int) -> list[int]:
    """The fake model's output for a `prompt`-token prompt."""
    return [token_after(prompt - 1 + i) for i in range(tokens)]


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.002)


def test_requests_run_chunk_by_chunk_then_decode_and_leave_nothing_held() -> None:
    """Three prompts (300, 100, 700 tokens) on 2 prefill instances: each is prefilled in
    64-token-aligned chunks whose groups only grow, covers its prompt exactly, decodes its 4
    tokens on the decode instance, and the ledger and every rank's KV end at zero."""
    async def test(engine: Engine, pool: FakePool) -> None:
        sizes = {"a": 300, "b": 100, "c": 700}
        streams = {rid: await submit(engine, rid, n) for rid, n in sizes.items()}
        for rid, stream in streams.items():
            events = await drain(stream)
            assert [t for e in events for t in e.token_ids] == expected(sizes[rid], 4)
            assert events[-1].finish_reason == "length"
            chunks = stream.summary.chunks
            assert chunks[0].start_token == 0 and chunks[-1].end_token == sizes[rid]
            for prev, nxt in itertools.pairwise(chunks):
                assert prev.end_token == nxt.start_token and prev.end_token % 64 == 0
                assert set(prev.instances) <= set(nxt.instances)
            assert stream.summary.decode_instances == (0,)
        await settled(engine, pool)
        assert engine.last_decision is not None
    run(test)


def test_time_slicing_cuts_a_long_prompt_into_several_launches() -> None:
    """Quantum 5 ms at 1e-4 s/token: a 2,000-token prompt alone runs as many chunks."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "long", 2000, max_tokens=1)
        events = await drain(stream)
        assert events[-1].finish_reason == "length"
        assert len(stream.summary.chunks) >= 4
        await settled(engine, pool)
    run(test, settings=SETTINGS.model_copy(update={"quantum_s": 0.005}))


def test_cancel_while_waiting_and_while_a_chunk_runs_frees_everything() -> None:
    """One prefill instance, chunks of 0.2 s: "b" waits behind "a" and is cancelled there;
    "a" is cancelled mid-chunk (its KV freed once the chunk ends); "c" still completes."""
    async def test(engine: Engine, pool: FakePool) -> None:
        a = await submit(engine, "a", 200)
        b = await submit(engine, "b", 200)
        await until(lambda: any("prefill a" in c for c in pool.calls))
        await b.cancel()
        await a.cancel()
        assert [e.finish_reason for e in await drain(a)] == ["abort"]
        assert [e.finish_reason for e in await drain(b)] == ["abort"]
        c = await submit(engine, "c", 100, max_tokens=2)
        assert (await drain(c))[-1].finish_reason == "length"
        await settled(engine, pool)
        assert not any("prefill b" in call for call in pool.calls)
    run(test, FakePool(num_prefill=1, prefill_delay_s=0.2))


def test_cancel_during_kv_transfer_and_during_decode_frees_everything() -> None:
    """Transfers of 0.2 s and steps of 20 ms, KV moved after prefill (stream_kv off): "a"
    leaves while its KV moves (freed when the transfer ends, on both sides), "b" after two
    tokens of decode."""
    async def test(engine: Engine, pool: FakePool) -> None:
        a = await submit(engine, "a", 100, max_tokens=50)
        await until(lambda: "move a" in pool.calls)
        await a.cancel()
        b = await submit(engine, "b", 100, max_tokens=50)
        tokens = 0
        async for event in b:
            tokens += len(event.token_ids)
            if tokens == 3:
                await b.cancel()
            if event.finish_reason is not None:
                assert event.finish_reason == "abort"
        assert tokens == 3
        await settled(engine, pool)
    run(test, FakePool(transfer_delay_s=0.2, step_delay_s=0.02),
        settings=SETTINGS.model_copy(update={"stream_kv": False}))


def test_a_chunk_failing_every_time_fails_its_request_only() -> None:
    """A live rank raises in every chunk of "bad": it is redone up to MAX_REDOS times, then its
    stream raises EngineError saying so; "good" completes, and nothing stays held."""
    async def test(engine: Engine, pool: FakePool) -> None:
        bad = await submit(engine, "bad", 300)
        good = await submit(engine, "good", 300)
        with pytest.raises(EngineError, match=f"interrupted .* {MAX_REDOS + 1} times"):
            await drain(bad)
        assert (await drain(good))[-1].finish_reason == "length"
        await settled(engine, pool)
    run(test, FakePool(fail_prefill={"bad"}))


def test_cp_refinement_never_blocks_the_serving_loop() -> None:
    """`tetris` (CP-SAT refining in the background, 500 ms per run) with ten prompts queued on
    two slow instances: an event-loop probe that sleeps 5 ms at a time, from the first request
    until a refinement has run to its limit, is never late by 20 ms or more."""
    async def test(engine: Engine, pool: FakePool) -> None:
        run_ = engine.policy.refiner.run  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()

        async def probe() -> float:
            worst, end = 0.0, loop.time() + 1.5
            while loop.time() < end and not run_.last_wall_s:
                before = loop.time()
                await asyncio.sleep(0.005)
                worst = max(worst, loop.time() - before - 0.005)
            return worst

        probing = asyncio.ensure_future(probe())
        streams = [await submit(engine, f"r{i}", 400 + 64 * i, max_tokens=1) for i in range(10)]
        worst = await probing
        assert run_.last_wall_s >= 0.4, "no refinement ran to its limit while probing"
        assert worst < 0.020, f"the serving loop stalled {worst * 1e3:.1f} ms"
        for stream in streams:
            await drain(stream)
        await settled(engine, pool)
    run(test, FakePool(prefill_delay_s=0.5), policy="tetris", lin=1e-3,
        settings=SETTINGS.model_copy(update={"time_limit_ms": 500.0, "quantum_s": None}))


def gauge(engine: Engine, name: str) -> float:
    body = engine.metrics.render()[0].decode()
    return float(next(line.split()[-1] for line in body.splitlines()
                      if line.startswith(name + " ")))


def test_a_request_past_its_deadline_ends_with_an_error_and_frees_everything() -> None:
    """Deadline 0.15 s, decode steps of 50 ms, 40 tokens asked: the stream yields some tokens,
    then raises DeadlineExceeded naming the limit; the ledger and the workers hold nothing
    and the running/waiting gauges are back to 0."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "slow", 100, max_tokens=40)
        seen = 0
        with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.15 s"):
            async for event in stream:
                seen += len(event.token_ids)
        assert 0 < seen < 40
        await settled(engine, pool)
        assert gauge(engine, "tetris:num_requests_running") == 0
        assert gauge(engine, "tetris:num_requests_waiting") == 0
    run(test, FakePool(step_delay_s=0.05), request_timeout_s=0.15)


def test_gauges_follow_requests_to_their_end() -> None:
    """Eight requests in flight show 8 running or waiting; once every stream ended both
    gauges read 0 (they were once left stale after decode)."""
    async def test(engine: Engine, pool: FakePool) -> None:
        streams = [await submit(engine, f"r{i}", 200, max_tokens=6) for i in range(8)]
        total = gauge(engine, "tetris:num_requests_running") + \
            gauge(engine, "tetris:num_requests_waiting")
        assert total == 8
        for stream in streams:
            await drain(stream)
        assert gauge(engine, "tetris:num_requests_running") == 0
        assert gauge(engine, "tetris:num_requests_waiting") == 0
    run(test, FakePool(step_delay_s=0.01))
