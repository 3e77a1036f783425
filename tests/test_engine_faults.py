"""Instance loss on the engine with a fake pool (no Ray, no model): a prefill instance killed
mid-chunk, a decode instance killed mid-stream, an idle one found by the probe — each request
still gets every token exactly once, health goes degraded and back, the lost instance is
replaced and the data plane re-formed, and nothing stays held."""

from __future__ import annotations

import asyncio

from tests.fake_pool import FakePool
from tests.test_engine import drain, expected, run, settled, submit, until
from tetris.runtime.engine import Engine


def tokens_of(events: list[object]) -> list[int]:
    return [t for e in events for t in e.token_ids]  # type: ignore[attr-defined]


def test_prefill_instance_killed_mid_chunk_redoes_the_request_on_the_survivors() -> None:
    """Rank 1 dies inside "a"'s first chunk on {0, 1}: "a" is prefilled again (its chunks after
    the loss avoid 1 until it is replaced), its 6 tokens are the fake model's exactly, the
    loss is counted, rank 1 is replaced, the world re-formed, and health returns to ok."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", 1500, max_tokens=6)
        events = await drain(stream)
        assert tokens_of(events) == expected(1500, 6)
        assert events[-1].finish_reason == "length"
        assert engine.instances_lost == 1 and engine.requests_recovered == 1
        await until(lambda: engine.health().status == "ok")
        assert "replace [1]" in pool.calls and pool.reforms == 1
        chunks = stream.summary.chunks
        assert chunks[0].start_token == 0 and chunks[-1].end_token == 1500
        await settled(engine, pool)
        # Serving goes on over both instances afterwards.
        assert tokens_of(await drain(await submit(engine, "b", 300))) == expected(300, 4)
        await settled(engine, pool)
    run(test, FakePool(kill_in_prefill={"a": 1}, prefill_delay_s=0.05))


def test_decode_instance_killed_mid_stream_continues_the_stream() -> None:
    """Decode rank 2 (decode instance 0 of 2) dies in its 3rd step while "a" decodes there:
    "a" is re-prefilled with its prompt and the tokens it had, decodes the rest elsewhere or
    on the replacement, and its 8 tokens have no repeat and no gap."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", 200, max_tokens=8)
        events = await drain(stream)
        assert tokens_of(events) == expected(200, 8)
        assert engine.instances_lost == 1 and engine.requests_recovered == 1
        # Its second prefill covered the prompt and the tokens already out.
        ends = [c.end_token for c in stream.summary.chunks]
        assert ends[-1] > 200
        await until(lambda: engine.health().status == "ok")
        await settled(engine, pool)
    run(test, FakePool(num_decode=2, kill_in_decode={2: 2}, step_delay_s=0.02))


def test_an_idle_instance_that_dies_is_found_by_the_probe() -> None:
    """Rank 0 dies with nothing running: within the probe interval health is degraded (one of
    two prefill instances live), then the replacement serves and health is ok again."""
    async def test(engine: Engine, pool: FakePool) -> None:
        assert engine.health().status == "ok"
        pool.kill(0)
        await until(lambda: engine.health().status == "degraded")
        assert engine.health().prefill_live == 1
        await until(lambda: engine.health().status == "ok")
        assert tokens_of(await drain(await submit(engine, "a", 300))) == expected(300, 4)
        await settled(engine, pool)
    run(test)


def test_requests_holding_kv_on_a_lost_instance_are_redone_and_others_untouched() -> None:
    """Three requests in flight when rank 0 dies: every one finishes with its exact tokens,
    and the ledger and all ranks end empty."""
    async def test(engine: Engine, pool: FakePool) -> None:
        streams = {rid: await submit(engine, rid, n, max_tokens=5)
                   for rid, n in (("a", 900), ("b", 300), ("c", 600))}
        await asyncio.sleep(0.03)
        pool.kill(0)
        for rid, stream in streams.items():
            n = {"a": 900, "b": 300, "c": 600}[rid]
            assert tokens_of(await drain(stream)) == expected(n, 5), rid
        await until(lambda: engine.health().status == "ok")
        await settled(engine, pool)
    run(test, FakePool(prefill_delay_s=0.04))


def test_no_work_is_sent_while_the_data_plane_is_re_formed() -> None:
    """"a" decodes 60 tokens while idle prefill rank 1 dies: the re-forming of the world (the
    fake pool asserts that no call arrives meanwhile) pauses decode too, and "a" still gets
    every token exactly once."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", 100, max_tokens=60)
        await until(lambda: len(stream.summary.token_ids) >= 3)
        pool.kill(1)
        assert tokens_of(await drain(stream)) == expected(100, 60)
        assert pool.reforms == 1 and engine.requests_recovered == 0
        await settled(engine, pool)
    run(test, FakePool(step_delay_s=0.01))
