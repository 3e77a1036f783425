"""KV streaming on live Ray actors of the embedded SmolLM2: a prompt prefilled in several SP-2
chunks streams each chunk's KV to two decode actors while later chunks compute — the first
batch is on decode before the last chunk ends — and the tokens are HF transformers' greedy
ones, with every actor's KV free afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live import hf_greedy, hf_model
from tetris.runtime.deployment import Deployment, deploy
from tetris.runtime.engine_api import GenerationRequest, RequestSummary
from tetris.runtime.ports import free_port
from tetris.runtime.sampling import SamplingParams
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig

pytest.importorskip("transformers")

NEW_TOKENS = 12
TEXT = ("Bees visit flowers for nectar and carry pollen from one blossom to the next, so the "
        "plants set seed and fruit. ")


@pytest.fixture(scope="module")
def deployment(ray_session: Any) -> Iterator[Deployment]:
    # A 0.4 s quantum cuts a 600-token prompt into several chunks on this host's calibration;
    # 400 tokens of decode room per instance splits its KV over both decode actors.
    config = ServeConfig(port=free_port(), prefill_instances=2, decode_instances=2,
                         kv_tokens_per_instance=4096, decode_kv_tokens_per_instance=400,
                         policy=SERVE_POLICY.model_copy(update={"quantum_s": 0.4}))
    d = deploy(config)
    yield d
    d.shutdown()


async def serve_one(deployment: Deployment, prompt: list[int]) -> RequestSummary:
    engine = deployment.engine
    await engine.start()
    try:
        stream = await engine.submit(GenerationRequest("streamed", prompt,
                                                       SamplingParams(max_tokens=NEW_TOKENS)))
        async for _ in stream:
            pass
        return stream.summary
    finally:
        await engine.stop()


def test_streamed_chunks_land_before_the_last_chunk_ends_and_match_hf(
        deployment: Deployment) -> None:
    """A 600-token greedy completion: at least 3 chunks, the KV split over both decode
    actors, the first streamed batch landed before the last chunk ended and the last batch
    completes the prompt, the tokens equal HF's, and every actor's KV is free after."""
    prompt = deployment.engine.encode(TEXT * 40)[:600]
    assert len(prompt) == 600
    expected = hf_greedy(hf_model(deployment.model_dir), deployment.engine.tokenizer.eos_ids,
                         prompt, NEW_TOKENS)
    summary = asyncio.run(serve_one(deployment, prompt))
    assert summary.token_ids == expected
    assert len(summary.chunks) >= 3, summary.chunks
    assert sorted(summary.decode_instances) == [0, 1]
    landed = summary.kv_landed
    assert landed and landed[-1].tokens == len(prompt)
    assert summary.prefilled_after_s is not None
    assert landed[0].after_s < summary.prefilled_after_s, (landed, summary.prefilled_after_s)
    ray, pool = deployment.ray, deployment.pool
    free = ray.get([a.free_tokens.remote() for a in pool.all], timeout=60)
    assert free == [pool.prefill_kv_tokens] * pool.num_prefill \
        + [pool.decode_kv_tokens] * len(pool.decode)
