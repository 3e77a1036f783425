"""KV streaming on the engine with a fake pool (no Ray, no model): a request's finished chunks'
KV goes to its decode instance while later chunks compute, its tokens are unchanged, and a
cancel, a deadline or an instance lost in the middle of a stream leaves nothing held."""

from __future__ import annotations

import pytest

from tests.fake_pool import FakePool
from tests.test_engine import SETTINGS, drain, expected, run, settled, submit, until
from tetris.runtime.engine import Engine
from tetris.runtime.engine_api import DeadlineExceeded

# Chunks of 384 tokens (a 20 ms quantum at 1e-4 s/token on 2 instances): a 1,000-token prompt
# prefills in three.
SLICED = SETTINGS.model_copy(update={"quantum_s": 0.02})
PROMPT = 1000


def tokens_of(events: list[object]) -> list[int]:
    return [t for e in events for t in e.token_ids]  # type: ignore[attr-defined]


def position(calls: list[str], prefix: str) -> int:
    return next(i for i, call in enumerate(calls) if call.startswith(prefix))


def test_first_chunks_kv_lands_on_decode_before_the_last_chunk_ends() -> None:
    """Three chunks [0,384), [384,768), [768,1000): the first chunk's KV is streamed and has
    landed before the last chunk ends, each chunk's KV goes as one batch (the last with the
    sampler), nothing moves after prefill, and the 4 tokens are the fake model's."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", PROMPT)
        assert tokens_of(await drain(stream)) == expected(PROMPT, 4)
        calls = pool.calls
        assert position(calls, "streamed a") < position(calls, f"prefilled a [768,{PROMPT})")
        assert [c for c in calls if c.startswith("stream ")] == \
            ["stream a 384", "stream a 384", "stream a 232 +sampler"]
        assert not any(c.startswith("move") for c in calls)
        summary = stream.summary
        assert [x.tokens for x in summary.kv_landed] == [384, 768, PROMPT]
        assert summary.prefilled_after_s is not None
        assert summary.kv_landed[0].after_s < summary.prefilled_after_s
        await settled(engine, pool)
    run(test, FakePool(prefill_delay_s=0.05), settings=SLICED)


def test_stream_kv_off_moves_the_whole_prompt_after_the_last_chunk() -> None:
    """stream_kv=False: the same three chunks, no streamed batch, one move after the last
    chunk, the same tokens."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", PROMPT)
        assert tokens_of(await drain(stream)) == expected(PROMPT, 4)
        assert not any(c.startswith("stream") for c in pool.calls)
        assert position(pool.calls, f"prefilled a [768,{PROMPT})") < \
            position(pool.calls, "move a")
        await settled(engine, pool)
    run(test, FakePool(prefill_delay_s=0.05),
        settings=SLICED.model_copy(update={"stream_kv": False}))


@pytest.mark.parametrize(("transfer_s", "when"), [(0.2, "stream a"), (0.001, "streamed a")],
                         ids=["batch-in-flight", "between-batches"])
def test_cancel_mid_stream_frees_everything(transfer_s: float, when: str) -> None:
    """Cancelled while its second chunk runs, with its first batch in flight (0.2 s
    transfers) or already landed: it ends "abort", the ledger and every rank's KV end empty,
    and a later request is served."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", PROMPT)
        await until(lambda: any(c.startswith(when) for c in pool.calls))
        assert sum(c.startswith("prefilled a") for c in pool.calls) == 1
        await stream.cancel()
        assert [e.finish_reason for e in await drain(stream)] == ["abort"]
        await settled(engine, pool)
        assert tokens_of(await drain(await submit(engine, "b", 300))) == expected(300, 4)
        await settled(engine, pool)
    run(test, FakePool(prefill_delay_s=0.1, transfer_delay_s=transfer_s), settings=SLICED)


def test_deadline_mid_stream_frees_everything() -> None:
    """A 0.15 s deadline during the second of three 0.1 s chunks, a batch streamed: the
    stream raises DeadlineExceeded and nothing stays held."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", PROMPT)
        with pytest.raises(DeadlineExceeded):
            await drain(stream)
        assert "stream a 384" in pool.calls
        await settled(engine, pool)
    run(test, FakePool(prefill_delay_s=0.1), settings=SLICED, request_timeout_s=0.15)


@pytest.mark.parametrize(("victim", "transfer_s"),
                         [(1, 0.001), (1, 0.2), ("decode", 0.001), ("decode", 0.2)],
                         ids=["prefill-idle-stream", "prefill-batch-in-flight",
                              "decode-idle-stream", "decode-batch-in-flight"])
def test_instance_lost_mid_stream_redoes_the_request_exactly(victim: int | str,
                                                             transfer_s: float) -> None:
    """Prefill rank 1, or the decode instance the KV streams to, dies once the first batch is
    out (landed, or still in flight): the request is redone, its 4 tokens are exact, the rank
    is replaced, and nothing stays held."""
    async def test(engine: Engine, pool: FakePool) -> None:
        stream = await submit(engine, "a", PROMPT)
        await until(lambda: "stream a 384" in pool.calls)
        rank = 1 if victim == 1 else stream.summary.decode_instances[0] + pool.num_prefill
        pool.kill(rank)
        assert tokens_of(await drain(stream)) == expected(PROMPT, 4)
        assert engine.instances_lost == 1 and engine.requests_recovered == 1
        await until(lambda: engine.health().status == "ok")
        await settled(engine, pool)
    run(test, FakePool(num_decode=2, prefill_delay_s=0.1, transfer_delay_s=transfer_s),
        settings=SLICED)
